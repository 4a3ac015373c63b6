"""Pieces shared by the commands: consoles, progress rendering, shared option types. Rich lives here, not in the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ldmcli.errors import UsageError


def stderr_console() -> Console:
    """Progress and messages go to stderr so stdout stays clean for ``--json``."""
    return Console(stderr=True, highlight=False)


def stdout_console() -> Console:
    return Console(highlight=False)


def is_interactive() -> bool:
    """True when stderr is a terminal: rich progress bars then; plain lines for cron logs otherwise."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------- shared option types
# ``Annotated`` types for options that several commands declare the same way (names, aliases and help); the default
# is the parameter's own (``device: DeviceOption = None``).

# generation: txt2img, knn2img and sample
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:N or mps (default: best "
                                                     "available).", show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON record per written file on stdout.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")]
SkipGridOption = Annotated[bool, typer.Option("--skip-grid", "--skip_grid", help="Do not write the grid.")]
CompileOption = Annotated[bool, typer.Option("--compile", help="torch.compile the UNet with frozen weights: minutes "
                                             "on the first run, then cached in the data dir.")]
TileDecodeOption = Annotated[bool, typer.Option("--tile-decode", help="Decode in overlapping tiles (512x512 pixels "
                                                "for f8 models) for images too big to decode at once; seams are "
                                                "blended.")]

# batch commands over input files: inpaint and upscale
BatchConfigOption = Annotated[Optional[Path], typer.Option("--config", help="A config file (ours or upstream's YAML) "
                                                           "instead of --model; needs --ckpt.", show_default=False)]
BatchCkptOption = Annotated[Optional[Path], typer.Option("--ckpt", help="A checkpoint file (.ckpt or .safetensors).",
                                                         show_default=False)]

# text/CLIP-prompted generation: txt2img and knn2img
PromptOption = Annotated[Optional[str], typer.Option("--prompt", help="The prompt (as upstream's script takes it).",
                                                     show_default=False)]
FromFileOption = Annotated[Optional[Path], typer.Option("--from-file", "--from_file", help="Render every line of "
                                                        "FILE (prompts batched by --n_samples).", show_default=False)]
ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="Config of a compatible model (upstream YAML "
                                                      "or ldmcli), with --ckpt.", show_default=False)]
CkptOption = Annotated[Optional[Path], typer.Option("--ckpt", help="Checkpoint (.ckpt or .safetensors) for --config "
                                                    "or --model.", show_default=False)]
OutdirOption = Annotated[Path, typer.Option("--outdir", help="Where samples/ and grids go.")]
StepsOption = Annotated[int, typer.Option("--ddim_steps", "--ddim-steps", "--steps", help="Sampling steps.")]
PlmsOption = Annotated[bool, typer.Option("--plms", help="Shorthand for --sampler plms.")]
SAMPLER_HELP = ("auto, ddim, plms, dpmpp (DPM-Solver++(2M)), dpmpp3m, unipc, unipc-bh1 or ddpm (the full chain). "
                "auto (default): the sampler and step count that reach 50 DDIM steps' accuracy with the fewest model "
                "calls for the guidance scale (--steps is then ignored); --sampler ddim --ddim_steps 50 is upstream's.")
EtaOption = Annotated[float, typer.Option("--ddim_eta", "--ddim-eta", "--eta", help="DDIM eta (0: deterministic).")]
NIterOption = Annotated[int, typer.Option("--n_iter", "--n-iter", help="Repeat the whole run this often (grid rows).")]
NSamplesOption = Annotated[int, typer.Option("--n_samples", "--n-samples", help="Images per prompt per iteration; "
                                             "with --from-file, prompts per batch.")]
PromptSeedOption = Annotated[Optional[int], typer.Option("--seed", help="Seed: image i of a prompt's run uses seed + i "
                                                         "(default: random, recorded in every PNG).",
                                                         show_default=False)]

# training: train-ae and train-ldm
TrainConfigOption = Annotated[Optional[str], typer.Option("--config", "-c", "--base", "-b", help="Training preset or "
                                                          "config file (upstream YAML or ldmcli).")]
ResumeOption = Annotated[Optional[Path], typer.Option("--resume", "-r", help="Continue a run: its folder or a "
                                                      "checkpoint.")]
DataOption = Annotated[Optional[Path], typer.Option("--data", help="Folder of training images (recursive).")]
MaxStepsOption = Annotated[Optional[int], typer.Option("--max-steps", help="Stop after this many optimizer steps.")]
MaxEpochsOption = Annotated[Optional[int], typer.Option("--max-epochs", help="Stop after this many epochs.")]
BatchSizeOption = Annotated[Optional[int], typer.Option("--batch-size", help="Batch size per device.")]
NumWorkersOption = Annotated[Optional[int], typer.Option("--num-workers", help="Data loading processes.")]
AccumulateOption = Annotated[Optional[int], typer.Option("--accumulate", help="Batches per optimizer step.")]
TrainPrecisionOption = Annotated[Optional[str], typer.Option("--precision", help="32, bf16-mixed or 16-mixed.")]
AcceleratorOption = Annotated[Optional[str], typer.Option("--accelerator", help="auto, cpu, gpu, mps.")]
DevicesOption = Annotated[Optional[str], typer.Option("--devices", help="Number of devices, 'auto', or indices 0,1.")]
GpusOption = Annotated[Optional[str], typer.Option("--gpus", help="Upstream main.py style GPU list, e.g. 0,1")]
NumNodesOption = Annotated[Optional[int], typer.Option("--num-nodes", help="Machines taking part (multi-node DDP).")]
StrategyOption = Annotated[Optional[str], typer.Option("--strategy", help="auto, ddp, ddp_spawn or fsdp.")]
TrainSeedOption = Annotated[Optional[int], typer.Option("--seed", "-s", help="Random seed (default 23, as upstream).")]
ScaleLrOption = Annotated[Optional[bool], typer.Option("--scale-lr/--no-scale-lr", help="lr = accumulate x devices x "
                                                       "batch size x base lr (default on).")]
CheckpointEveryOption = Annotated[Optional[int], typer.Option("--checkpoint-every", help="Steps between "
                                                              "checkpoints/last.ckpt updates.")]
KeepEveryOption = Annotated[Optional[int], typer.Option("--keep-every", help="Keep step-N.ckpt every N steps.")]
LogImagesEveryOption = Annotated[Optional[int], typer.Option("--log-images-every", help="Steps between PNG image "
                                                             "logs (0: off).")]
RecordExamplesOption = Annotated[bool, typer.Option("--record-examples", help="Write the example indices each "
                                                    "process trained on.")]
LogdirOption = Annotated[Path, typer.Option("--logdir", "-l", help="Where run folders are created.")]
RunNameOption = Annotated[Optional[str], typer.Option("--name", "-n", help="Run name (default: the config's).")]


def pick_sampler(sampler: Optional[str], plms: bool, vanilla: bool = False) -> str:
    """``--sampler`` with upstream's ``--plms`` / ``--vanilla_sample`` flags as shorthands (conflicts are errors)."""
    chosen = sampler.strip().lower() if sampler is not None else None
    for flag, name, given in (("--plms", "plms", plms), ("--vanilla_sample", "ddpm", vanilla)):
        if given:
            if chosen is not None and chosen != name:
                raise UsageError(f"{flag} conflicts with --sampler {chosen}")
            chosen = name
    return chosen or "auto"


def check_config_ckpt(config: Optional[Path], ckpt: Optional[Path]) -> None:
    """``--config`` needs ``--ckpt``, and both must exist (checked before anything else)."""
    if config is not None:
        if not Path(config).is_file():
            raise UsageError(f"--config: file not found: {config}")
        if ckpt is None:
            raise UsageError("--config needs --ckpt (the checkpoint to load with it)")
    if ckpt is not None and not Path(ckpt).is_file():
        raise UsageError(f"--ckpt: file not found: {ckpt}")
