"""``ldm train-ldm``: train a latent diffusion model (any conditioning, EMA, warm-up schedule) with Lightning;
the run is :func:`ldmcli.training.run.run_training`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ldmcli.commands import _common as opts
from ldmcli.commands import _train
from ldmcli.commands._train import HELP_EPILOG


def register(app: typer.Typer) -> None:
    @app.command("train-ldm", epilog=HELP_EPILOG)
    def train_ldm(
        config: opts.TrainConfigOption = None,
        resume: opts.ResumeOption = None,
        data: opts.DataOption = None,
        val_data: _train.ValDataOption = None,
        val_fraction: _train.ValFractionOption = None,
        val_every: _train.ValEveryOption = None,
        eval_every: _train.EvalEveryOption = None,
        eval_samples: _train.EvalSamplesOption = None,
        eval_ref: _train.EvalRefOption = None,
        eval_sampler: _train.EvalSamplerOption = None,
        eval_steps: _train.EvalStepsOption = None,
        eval_scale: _train.EvalScaleOption = None,
        first_stage: Optional[str] = typer.Option(None, "--first-stage",
                                                  help="Frozen autoencoder: a zoo name (kl-f8) or a train-ae run/checkpoint."),
        cond_drop: Optional[float] = typer.Option(None, "--cond-drop",
                                                  help="Probability of the null condition (classifier-free guidance)."),
        max_steps: opts.MaxStepsOption = None,
        max_epochs: opts.MaxEpochsOption = None,
        batch_size: opts.BatchSizeOption = None,
        num_workers: opts.NumWorkersOption = None,
        accumulate: opts.AccumulateOption = None,
        precision: opts.TrainPrecisionOption = None,
        accelerator: opts.AcceleratorOption = None,
        devices: opts.DevicesOption = None,
        gpus: opts.GpusOption = None,
        num_nodes: opts.NumNodesOption = None,
        strategy: opts.StrategyOption = None,
        seed: opts.TrainSeedOption = None,
        scale_lr: opts.ScaleLrOption = None,
        checkpoint_every: opts.CheckpointEveryOption = None,
        keep_every: opts.KeepEveryOption = None,
        log_images_every: opts.LogImagesEveryOption = None,
        record_examples: opts.RecordExamplesOption = False,
        logdir: opts.LogdirOption = Path("logs"),
        name: opts.RunNameOption = None,
    ) -> None:
        """Train a latent diffusion model on the latents of a frozen first stage."""
        _train.run_command("ldm", **locals())
