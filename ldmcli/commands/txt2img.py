"""``ldm txt2img``: images from text with a text-conditional LDM (upstream ``scripts/txt2img.py``), plus the shared
rendering of generation runs (progress bar, ``--json`` records, summary) that ``ldm sample`` uses too."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import typer

from ldmcli.commands import _common as opts
from ldmcli.commands._common import is_interactive, stderr_console
from ldmcli.errors import UsageError

DEFAULT_MODEL = "txt2img-f8-large"


class RunDisplay:
    """Renders a generation run: one rich progress bar over all sampler steps of the run with images/s on a
    terminal (stderr); nothing but the final summary otherwise. ``--json`` records go to stdout as files appear."""

    def __init__(self, *, as_json: bool, quiet: bool, rank_prefix: str = "") -> None:
        self.as_json = as_json
        self.quiet = quiet
        self.console = stderr_console()
        self.interactive = is_interactive() and not quiet
        self.prefix = rank_prefix
        self.progress: Any = None
        self.task: Any = None
        self.status: Any = None
        self.started = time.perf_counter()
        self.images = 0
        self.grids = 0

    def __enter__(self) -> "RunDisplay":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.refresh()
            self.progress.stop()
            self.progress = None

    def message(self, text: str) -> None:
        """A stage line (loading, downloading), shown on a terminal only."""
        if self.interactive and self.progress is None:
            self.console.print(f"ldm: {self.prefix}{text}", style="dim", soft_wrap=True, markup=False)

    def download(self, done: int, total: int | None, label: str) -> None:
        """The store's download progress ``(done, total, label)``."""
        if not self.interactive:
            return
        if self.progress is None:
            self._start_bar()
        if self.status is None:
            self.status = self.progress.add_task(f"downloading {label}", total=total or None, rate="")
        self.progress.update(self.status, completed=done, total=total or None)
        self.progress.refresh()

    def _start_bar(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, auto_refresh=False, transient=False)
        self.progress.start()

    def event(self, ev: Any) -> None:
        """A :class:`ldmcli.generate.GenerationEvent`."""
        if ev.kind == "file":
            if ev.file.kind == "grid":
                self.grids += 1
            else:
                self.images += 1
            if self.as_json:
                typer.echo(json.dumps(ev.file.record(), sort_keys=True))
        if not self.interactive:
            return
        if self.progress is None:
            self._start_bar()
        if self.task is None:
            self.task = self.progress.add_task(f"{self.prefix}sampling", total=ev.steps_total, rate="")
            self.started = time.perf_counter()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = f"{ev.images_done / elapsed:.2f} images/s" if ev.images_done else ""
        self.progress.update(self.task, completed=ev.steps_done, total=ev.steps_total, rate=rate)
        self.progress.refresh()

    def summary(self, outdir: Path, seconds: float, seed: int, interrupted: bool = False) -> None:
        self.stop()
        if self.quiet and not interrupted:
            return
        rate = f", {self.images / seconds:.2f} images/s" if seconds > 0 and self.images else ""
        grids = f" and {self.grids} grid{'s' if self.grids != 1 else ''}" if self.grids else ""
        what = "interrupted: kept" if interrupted else "wrote"
        self.console.print(f"ldm: {self.prefix}{what} {self.images} image{'s' if self.images != 1 else ''}{grids} "
                           f"in {outdir} ({seconds:.1f} s{rate}; seed {seed})", soft_wrap=True, markup=False)


def run_generation(display: RunDisplay, outdir: Path, seed: int, work: Callable[[], Any]) -> Any:
    """Run ``work`` with the display; on Ctrl-C say how many images were kept, then let the CLI exit 130."""
    started = time.perf_counter()
    try:
        result = work()
    except KeyboardInterrupt:
        display.summary(outdir, time.perf_counter() - started, seed, interrupted=True)
        raise
    display.summary(outdir, result.seconds, seed)
    return result


def read_prompt_file(path: Path) -> list[str]:
    """Prompts from ``--from-file``: one per non-empty line (an unreadable or empty file is a UsageError)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UsageError(f"--from-file: cannot read {path}: {reason}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"--from-file: {path} holds no prompts")
    return prompts


def pick_sampler(sampler: Optional[str], plms: bool, vanilla: bool = False) -> str:
    """``--sampler`` with upstream's ``--plms`` / ``--vanilla_sample`` flags as shorthands (conflicts are errors)."""
    chosen = sampler.strip().lower() if sampler is not None else None
    for flag, name, given in (("--plms", "plms", plms), ("--vanilla_sample", "ddpm", vanilla)):
        if given:
            if chosen is not None and chosen != name:
                raise UsageError(f"{flag} conflicts with --sampler {chosen}")
            chosen = name
    return chosen or "ddim"


def check_counts(counts: Iterable[tuple[str, int]], n_rows: int, seed: Optional[int]) -> None:
    """The cheap checks every generation command makes: each ``(flag, count)`` at least 1, ``--n_rows`` not negative,
    ``--seed`` in the range the generator takes."""
    from ldmcli.generate import MAX_SEED

    for flag, value in counts:
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if n_rows < 0:
        raise UsageError(f"--n_rows must be >= 0, got {n_rows}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED}, got {seed}")


def txt2img_command(
    prompt_arg: Optional[str] = typer.Argument(None, metavar="PROMPT", help="The prompt to render.",
                                               show_default=False),
    prompt_opt: opts.PromptOption = None,
    from_file: opts.FromFileOption = None,
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Zoo name of a text-to-image LDM."),
    config: opts.ConfigOption = None,
    ckpt: opts.CkptOption = None,
    outdir: opts.OutdirOption = Path("outputs/txt2img-samples"),
    ddim_steps: opts.StepsOption = 50,
    plms: opts.PlmsOption = False,
    sampler: Optional[str] = typer.Option(None, "--sampler", help="ddim, plms, dpmpp (DPM-Solver++(2M)) or ddpm "
                                          "(the full 1000-step chain) (default: ddim).", show_default=False),
    ddim_eta: opts.EtaOption = 0.0,
    n_iter: opts.NIterOption = 1,
    height: int = typer.Option(256, "--H", help="Image height in pixels (larger than 256 runs convolutionally)."),
    width: int = typer.Option(256, "--W", help="Image width in pixels."),
    n_samples: opts.NSamplesOption = 4,
    n_rows: int = typer.Option(0, "--n_rows", "--n-rows", help="Images per grid row (default: n_samples).",
                                show_default=False),
    scale: float = typer.Option(5.0, "--scale", help="Classifier-free guidance scale: eps(x, '') + scale * "
                                "(eps(x, prompt) - eps(x, '')); 1 disables guidance."),
    seed: opts.PromptSeedOption = None,
    skip_grid: opts.SkipGridOption = False,
    device: opts.DeviceOption = None,
    precision: str = typer.Option("auto", "--precision", help="fp32, bf16, fp16 or auto (bf16 where the hardware "
                                  "has it natively)."),
    compile_unet: opts.CompileOption = False,
    tile_decode: opts.TileDecodeOption = False,
    as_json: opts.JsonOption = False,
    quiet: opts.QuietOption = False,
) -> None:
    """Generate images from text (txt2img-f8-large by default), as upstream's scripts/txt2img.py.

    Writes OUTDIR/samples/00000.png, ... and OUTDIR/grid-0000.png; numbering continues after existing files and
    every PNG records its settings. Under torchrun, --from-file prompts are split across the ranks.
    """
    from ldmcli import generate as gen
    from ldmcli.devices import pick_device, resolve_precision
    from ldmcli.fastpath import DEFAULT_TILE

    # ---- everything cheap is checked before any model is loaded
    sources = (("PROMPT", prompt_arg), ("--prompt", prompt_opt), ("--from-file", from_file))
    given = [name for name, value in sources if value is not None]
    if len(given) > 1:
        raise UsageError(f"give one of PROMPT, --prompt and --from-file, not {' and '.join(given)}")
    if not given:
        raise UsageError("give a PROMPT (or --prompt TEXT, or --from-file FILE)")
    check_counts((("--n_samples", n_samples), ("--n_iter", n_iter)), n_rows, seed)
    if from_file is not None:
        items = gen_items = read_prompt_file(from_file)
    else:
        text = prompt_arg if prompt_arg is not None else prompt_opt
        if not text.strip():
            raise UsageError("the prompt is empty")
        items = [text] * n_samples
        gen_items = [text]
    settings = gen.SamplerSettings(pick_sampler(sampler, plms), ddim_steps, ddim_eta, scale)
    settings.validate()
    source = gen.resolve_model(None if config is not None else model, config, ckpt)
    if source.config is not None:
        _check_text_model(source.config, source.name)
        shape = gen.check_image_size(source.config, height, width, source.name)
        settings.validate(source.config.ldm.timesteps)
    dev = pick_device(device)
    dtype = resolve_precision(precision, dev)

    with gen.distributed(dev) as env:
        prefix = f"[rank {env.rank}] " if env.world_size > 1 else ""
        with RunDisplay(as_json=as_json, quiet=quiet, rank_prefix=prefix) as display:
            net = load_for_sampling(source, gen.rank_device(dev, env), dtype, display, compile=compile_unet)
            cfg = net.ldm_config
            _check_text_model(cfg, source.name)
            shape = gen.check_image_size(cfg, height, width, source.name)
            settings.validate(net.num_timesteps)
            run_seed = gen.shared_seed(seed, env)
            jobs = gen.rank_jobs(gen.plan_jobs(items, n_samples, n_iter, run_seed), env.rank, env.world_size)
            base = {"command": "txt2img", **gen.base_metadata(net, source.name, settings, dtype),
                    "height": height, "width": width, "base_seed": run_seed}

            def metadata(job: gen.Job, k: int) -> dict[str, Any]:
                return {**base, "prompt": job.items[k], "seed": job.seeds[k], "prompt_index": job.item_indices[k]
                        if from_file is not None else 0, "iteration": job.iteration}

            grid_meta = {**base, "prompts": sorted(set(gen_items)), "seeds": [s for j in jobs for s in j.seeds]}
            writer = gen.ImageWriter(outdir)
            run_generation(display, outdir, run_seed, lambda: gen.generate(
                net, jobs, conditioner=gen.TextConditioner(net, scale), shape=shape, settings=settings,
                writer=writer, metadata=metadata, grid_metadata=grid_meta,
                grid_per_row=None if skip_grid else (n_rows or n_samples), device=net_device(net),
                decode_tile=DEFAULT_TILE if tile_decode else None, callback=display.event))


def net_device(net: Any) -> Any:
    return next(net.parameters()).device


def load_for_sampling(source: Any, device: Any, dtype: Any, display: RunDisplay, *, compile: bool = False) -> Any:
    """``load_model`` on the CPU, then the inference fast path (``dtype``, channels_last; ``compile``) onto ``device``."""
    from ldmcli.fastpath import prepare_for_inference
    from ldmcli.loading import load_model

    display.message(f"loading {source.name}")
    net = load_model(source.target, ckpt=source.ckpt, callback=display.message, progress=display.download)
    return prepare_for_inference(net, dtype=dtype, device=device, compile=compile, callback=display.message)


def _check_text_model(cfg: Any, name: str) -> None:
    if cfg.ldm is None:
        raise UsageError(f"{name} is a first stage (autoencoder), not a diffusion model")
    cond = cfg.ldm.cond_stage
    if cond.type != "bert" or not getattr(cond.params, "use_tokenizer", True):
        what = {"class": "class-conditional", "unconditional": "unconditional"}.get(cond.type, f"a {cond.type} model")
        raise UsageError(f"{name} is not a text-to-image model ({what}); use 'ldm sample' for unconditional and "
                         f"class-conditional models")


def register(app: typer.Typer) -> None:
    app.command("txt2img")(txt2img_command)
