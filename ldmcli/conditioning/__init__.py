"""Conditioning inputs for the zoo's image-conditioned models, as pure functions (no model, no CLI):

* :mod:`ldmcli.conditioning.superres`: LDSR (``bsr_sr``) low-resolution images, padding and the patch plan;
* :mod:`ldmcli.conditioning.segmentation`: COCO-Stuff label maps for ``semantic_synthesis256/512``;
* :mod:`ldmcli.conditioning.layout`: bounding-box layouts as tokens for ``layout2img-openimages256``.

Bad user input raises :class:`ldmcli.errors.UsageError` with a one-line message, before any model is needed.
"""
