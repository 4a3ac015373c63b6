"""Training first stages and latent diffusion models (Rombach et al., 2022) with the Lightning 2 Trainer.

``ldm train-ae`` and ``ldm train-ldm`` build a :class:`~ldmcli.training.run.TrainRequest` and call
:func:`ldmcli.training.run.run_training` (or its keyword form :func:`~ldmcli.training.run.train`); everything here is
usable from Python and reports progress only as :class:`~ldmcli.training.events.TrainEvent` s through the
``callback=`` it is given. Lightning (and torch) are imported only once the request has been checked.
"""
