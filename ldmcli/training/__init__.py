"""Training first stages and latent diffusion models (Rombach et al., 2022) with the Lightning 2 Trainer.

``ldm train-ae`` and ``ldm train-ldm`` are thin wrappers over :func:`ldmcli.training.run.train`; everything here is
usable from Python and reports progress only through the ``callback=`` it is given.
"""
