"""One pipeline per task: a typed request in, typed events out (:mod:`ldmcli.pipelines.events`), files written.

Each task module has a ``*Request`` dataclass, ``check(request)`` (every check that needs no weights, raising
:class:`ldmcli.errors.UsageError` before anything expensive) and ``run(request, on_event=...)``:

* :mod:`~ldmcli.pipelines.txt2img`: text to image (``ldm txt2img``);
* :mod:`~ldmcli.pipelines.sample`: unconditional, class-conditional, label-map and layout sampling (``ldm sample``);
* :mod:`~ldmcli.pipelines.knn2img`: retrieval-augmented generation (``ldm knn2img``);
* :mod:`~ldmcli.pipelines.inpaint`: inpainting of image/mask pairs (``ldm inpaint``);
* :mod:`~ldmcli.pipelines.upscale`: 4x super-resolution with LDSR (``ldm upscale``).

:mod:`~ldmcli.pipelines.generation` holds what the generation tasks share (image plans and seeds, conditioners,
torchrun, the sample-decode-write loop). Nothing here prints; the commands in :mod:`ldmcli.commands` render events.
"""
