"""``ldm train-ldm``: train a latent diffusion model (any conditioning, EMA, warm-up schedule) with Lightning."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ldmcli.commands.train_ae import HELP_EPILOG, run_training_command


def register(app: typer.Typer) -> None:
    @app.command("train-ldm", epilog=HELP_EPILOG)
    def train_ldm(
        config: Optional[str] = typer.Option(None, "--config", "-c", "--base", "-b",
                                             help="Training preset or config file (upstream YAML or ldmcli)."),
        resume: Optional[Path] = typer.Option(None, "--resume", "-r", help="Continue a run: its folder or a checkpoint."),
        data: Optional[Path] = typer.Option(None, "--data", help="Folder of training images (recursive)."),
        first_stage: Optional[str] = typer.Option(None, "--first-stage",
                                                  help="Frozen autoencoder: a zoo name (kl-f8) or a train-ae run/checkpoint."),
        cond_drop: Optional[float] = typer.Option(None, "--cond-drop",
                                                  help="Probability of the null condition (classifier-free guidance)."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
        max_epochs: Optional[int] = typer.Option(None, "--max-epochs", help="Stop after this many epochs."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size per device."),
        num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Data loading processes."),
        accumulate: Optional[int] = typer.Option(None, "--accumulate", help="Batches per optimizer step."),
        precision: Optional[str] = typer.Option(None, "--precision", help="32, bf16-mixed or 16-mixed."),
        accelerator: Optional[str] = typer.Option(None, "--accelerator", help="auto, cpu, gpu, mps."),
        devices: Optional[str] = typer.Option(None, "--devices", help="Number of devices, 'auto', or indices 0,1."),
        gpus: Optional[str] = typer.Option(None, "--gpus", help="Upstream main.py style GPU list, e.g. 0,1"),
        num_nodes: Optional[int] = typer.Option(None, "--num-nodes", help="Machines taking part (multi-node DDP)."),
        strategy: Optional[str] = typer.Option(None, "--strategy", help="auto, ddp, ddp_spawn or fsdp."),
        seed: Optional[int] = typer.Option(None, "--seed", "-s", help="Random seed (default 23, as upstream)."),
        scale_lr: Optional[bool] = typer.Option(None, "--scale-lr/--no-scale-lr",
                                                help="lr = accumulate x devices x batch size x base lr (default on)."),
        checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every",
                                                       help="Steps between checkpoints/last.ckpt updates."),
        keep_every: Optional[int] = typer.Option(None, "--keep-every", help="Keep step-N.ckpt every N steps."),
        log_images_every: Optional[int] = typer.Option(None, "--log-images-every",
                                                       help="Steps between PNG image logs (0: off)."),
        record_examples: bool = typer.Option(False, "--record-examples",
                                             help="Write the example indices each process trained on."),
        logdir: Path = typer.Option(Path("logs"), "--logdir", "-l", help="Where run folders are created."),
        name: Optional[str] = typer.Option(None, "--name", "-n", help="Run name (default: the config's)."),
    ) -> None:
        """Train a latent diffusion model on the latents of a frozen first stage."""
        run_training_command("ldm", **locals())
