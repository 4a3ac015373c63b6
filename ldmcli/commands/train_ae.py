"""``ldm train-ae``: train a first-stage autoencoder (KL or VQ, with LPIPS + PatchGAN losses) with Lightning.

Options shared with ``ldm train-ldm`` are declared in ``_common`` and ``_train``; the run is
:func:`ldmcli.training.run.run_training`."""

from __future__ import annotations

from pathlib import Path

import typer

from ldmcli.commands import _common as opts
from ldmcli.commands import _train
from ldmcli.commands._train import HELP_EPILOG


def register(app: typer.Typer) -> None:
    @app.command("train-ae", epilog=HELP_EPILOG)
    def train_ae(
        config: opts.TrainConfigOption = None,
        resume: opts.ResumeOption = None,
        data: opts.DataOption = None,
        val_data: _train.ValDataOption = None,
        val_fraction: _train.ValFractionOption = None,
        val_every: _train.ValEveryOption = None,
        eval_every: _train.EvalEveryOption = None,
        eval_samples: _train.EvalSamplesOption = None,
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
        """Train a first-stage autoencoder (AutoencoderKL or VQModel) on images."""
        _train.run_command("autoencoder", **locals())
