"""The generation core every image-making pipeline shares: plan the images of a run, condition, sample, decode, write.

A run is a list of *items* (one per image of an iteration: a prompt, a class id, or None for unconditional models)
cut into batches and repeated ``n_iter`` times, as upstream's scripts do. Every image has its own seed,
``seed + iteration * len(items) + item_index``, drawn from its own CPU ``torch.Generator`` (the initial noise and,
for stochastic samplers, every later noise draw), so an image depends neither on what else is in its batch, nor on
the device's RNG, nor on how many processes share the run. Under ``torchrun`` the batches are dealt round-robin to
the ranks (:func:`distributed`); seeds do not change with the number of ranks.

The conditioner runs once per distinct prompt (and the unconditional "" once per run). Files are written per batch as
soon as they are decoded (:mod:`ldmcli.output`), so an interrupted run keeps every image it finished. Progress goes
through ``on_event`` (:mod:`ldmcli.pipelines.events`); nothing here prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ldmcli import __version__, paths
from ldmcli.errors import RequestError, UsageError
from ldmcli.fileio import atomic_write_text, sha256_file
from ldmcli.output import ImageWriter, WrittenFile, to_uint8
from ldmcli.pipelines.events import EventHandler, FileWritten, Message, Started, Step, downloads, ignore, messages
from ldmcli.sampling import DiscreteSchedule, SamplerSettings, SamplerStep, sample_latents

MAX_SEED = 2**63 - 1


# ------------------------------------------------------------------------------------------------------ settings


# ---------------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Job:
    """One batch: the item of each image (prompt, class id or None), its index in the run's items, and its seed."""

    index: int
    iteration: int
    items: tuple[Any, ...]
    item_indices: tuple[int, ...]
    seeds: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.items)


def plan_jobs(items: Sequence[Any], batch_size: int, n_iter: int, seed: int) -> list[Job]:
    """Cut ``items`` into batches of ``batch_size`` and repeat ``n_iter`` times (iteration-major, as upstream).

    Image seed: ``seed + iteration * len(items) + item_index``; with one prompt repeated ``n_samples`` times this is
    ``seed + image number``, so ``--seed S --n_samples 1`` reproduces the first image of a run with seed S.
    """
    if batch_size < 1 or n_iter < 1 or not items:
        raise ValueError("plan_jobs needs items, batch_size >= 1 and n_iter >= 1")
    jobs: list[Job] = []
    for iteration in range(n_iter):
        for start in range(0, len(items), batch_size):
            idx = tuple(range(start, min(start + batch_size, len(items))))
            seeds = tuple((seed + iteration * len(items) + i) % (MAX_SEED + 1) for i in idx)
            jobs.append(Job(len(jobs), iteration, tuple(items[i] for i in idx), idx, seeds))
    return jobs


def rank_jobs(jobs: Sequence[Job], rank: int, world_size: int) -> list[Job]:
    """The batches rank ``rank`` of ``world_size`` runs: every ``world_size``-th, starting at ``rank``."""
    return [job for job in jobs if job.index % world_size == rank]


def random_seed() -> int:
    """A fresh seed for runs without ``--seed`` (recorded in every image, so the run can be repeated)."""
    return secrets.randbelow(2**31)


# ---------------------------------------------------------------------------------------------------- torchrun


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def torchrun_env() -> Distributed:
    """Rank and world size from ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return Distributed(rank, world, local)


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[Distributed]:
    """Join the process group when launched by ``torchrun`` with more than one process (gloo on the CPU, nccl on
    CUDA); a plain run is rank 0 of 1 and touches nothing."""
    env = torchrun_env()
    if env.world_size == 1:
        yield env
        return
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(rank_device(device, env))  # nccl needs each process on its own GPU first
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    try:
        yield env
        dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()


def rank_device(device: torch.device, env: Distributed) -> torch.device:
    """One GPU per process under torchrun: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and device.index is None and env.world_size > 1:
        return torch.device("cuda", env.local_rank)
    return device


def shared_seed(seed: int | None, env: Distributed) -> int:
    """The run's seed: the given one, or a random one chosen by rank 0 and shared with the other ranks."""
    if seed is not None:
        return seed
    value = random_seed()
    if env.world_size > 1:
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = int(box[0])
    return value


# ------------------------------------------------------------------------------------------------ conditioning


class Conditioner:
    """Unconditional models: no conditioning."""

    def __call__(self, job: Job) -> tuple[Any, Any]:
        return None, None


class TextConditioner(Conditioner):
    """Text prompts through the model's conditioner (BERT for the LDMs), once per distinct prompt per run, and the
    unconditional "" once per run (only when guidance needs it)."""

    def __init__(self, model: Any, scale: float) -> None:
        self.model = model
        self.scale = scale
        self.cache: dict[str, torch.Tensor] = {}
        self.encoded = 0

    def _rows(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if missing:
            out = self.model.get_learned_conditioning(missing)
            self.encoded += len(missing)
            for i, p in enumerate(missing):
                self.cache[p] = out[i : i + 1]
        return torch.cat([self.cache[p] for p in prompts])

    def __call__(self, job: Job) -> tuple[Any, Any]:
        cond = self._rows(list(job.items))
        uncond = self._rows([""] * len(job)) if self.scale != 1.0 else None
        return cond, uncond


class ClassConditioner(Conditioner):
    """Class labels through the model's ``ClassEmbedder`` (as upstream's ``{cond_stage_key: labels}`` batch); the
    unconditional input is the null class (cin256-v2: 1000)."""

    def __init__(self, model: Any, scale: float, null_class: int | None) -> None:
        self.model = model
        self.scale = scale
        self.null_class = null_class
        self.key = getattr(model, "cond_stage_key", "class_label")
        self.device = next(model.parameters()).device

    def _embed(self, labels: Sequence[int]) -> torch.Tensor:
        return self.model.get_learned_conditioning({self.key: torch.tensor(list(labels), device=self.device)})

    def __call__(self, job: Job) -> tuple[Any, Any]:
        cond = self._embed(job.items)
        uncond = None
        if self.scale != 1.0 and self.null_class is not None:
            uncond = self._embed([self.null_class] * len(job))
        return cond, uncond


class FixedConditioner(Conditioner):
    """One conditioning input for every image of a run (a one-hot label map, layout tokens): through the model's
    conditioner once (on the model's device, floats in the conditioner's dtype), repeated to each batch's size. No
    unconditional input: these models are sampled without guidance."""

    def __init__(self, model: Any, raw: torch.Tensor) -> None:
        self.model = model
        self.raw = raw
        self.cond: torch.Tensor | None = None

    def __call__(self, job: Job) -> tuple[Any, Any]:
        if self.cond is None:
            raw = self.raw.to(model_device(self.model))
            if raw.is_floating_point():
                param = next(self.model.cond_stage_model.parameters(), None)
                raw = raw.to(param.dtype if param is not None else torch.float32)
            self.cond = self.model.get_learned_conditioning(raw)
        return self.cond.repeat(len(job), *([1] * (self.cond.dim() - 1))), None


# ------------------------------------------------------------------------------------------------------- sha256


def cached_sha256(path: str | os.PathLike, known: str | None = None) -> str | None:
    """sha256 of a checkpoint, cached by path, size and mtime in ``<data dir>/cache/sha256.json`` (a big checkpoint
    is hashed once, not on every run)."""
    if known:
        return known
    path = Path(path)
    if not path.is_file():
        return None
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = paths.cache_dir() / "sha256.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache, dict) and isinstance(cache.get(key), str):
        return cache[key]
    value = sha256_file(path)
    try:
        cache = cache if isinstance(cache, dict) else {}
        cache[key] = value
        atomic_write_text(cache_file, json.dumps(cache, indent=0))
    except OSError:
        pass  # a read-only data dir only costs the cache
    return value


# ----------------------------------------------------------------------------------------------------------- run


@dataclass
class GenerationResult:
    files: list[WrittenFile] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0
    seed: int = 0


MetadataFn = Callable[[Job, int], Mapping[str, Any]]


def generate(
    model: Any,
    jobs: Sequence[Job],
    *,
    conditioner: Conditioner,
    shape: Sequence[int],
    settings: SamplerSettings,
    writer: ImageWriter,
    metadata: MetadataFn,
    grid_metadata: Mapping[str, Any] | None = None,
    grid_per_row: int | None = None,
    device: torch.device | str = "cpu",
    decode_tile: int | None = None,
    on_event: EventHandler = ignore,
    seed: int = 0,
) -> GenerationResult:
    """Sample, decode and write every job's images (one PNG each, with ``metadata(job, k)``), then one grid of the
    run's images (``grid_per_row`` to a row; None: no grid). ``shape`` is the latent (C, H, W)."""
    from ldmcli.fastpath import decode_latents, inference_context

    device = torch.device(device)
    schedule = DiscreteSchedule.from_model(model)
    per_batch = settings.num_steps(schedule)
    steps_total = per_batch * len(jobs)
    images_total = sum(len(job) for job in jobs)
    result = GenerationResult()
    grid_images: list[np.ndarray] = []
    started = time.perf_counter()
    done_steps = 0

    def emit(kind: str, file: WrittenFile | None = None) -> None:
        if kind == "file":
            on_event(FileWritten(file, done_steps, steps_total, result.images, images_total))
        else:
            on_event(Step(done_steps, steps_total, result.images, images_total))

    result.seed = seed
    on_event(Started(steps_total, images_total, seed))
    with inference_context():
        for job in jobs:
            generators = [torch.Generator("cpu").manual_seed(s) for s in job.seeds]
            x_T = torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)
            cond, uncond = conditioner(job)
            base = done_steps

            def on_step(step: SamplerStep, base: int = base) -> None:
                nonlocal done_steps
                done_steps = base + step.i + 1
                emit("step")

            latents = sample_latents(model, x_T, cond, uncond, settings, schedule=schedule, generator=generators,
                                     callback=on_step)
            done_steps = base + per_batch
            pixels = to_uint8(decode_latents(model, latents, tile=decode_tile))
            for k in range(len(job)):
                written = writer.write_sample(pixels[k], metadata(job, k))
                result.files.append(written)
                result.images += 1
                emit("file", written)
            if grid_per_row is not None:
                grid_images.extend(pixels)
    if grid_per_row is not None and grid_images:
        written = writer.write_grid(np.stack(grid_images), grid_per_row, grid_metadata or {})
        result.files.append(written)
        emit("file", written)
    result.seconds = time.perf_counter() - started
    return result


def base_metadata(loaded: Any, settings: SamplerSettings, dtype: torch.dtype) -> dict[str, Any]:
    """Settings shared by every image of a run (``loaded``: :class:`ldmcli.loading.Loaded`): model, checkpoint,
    sampler and software version."""
    schedule = DiscreteSchedule.from_model(loaded.model)
    ran = settings.resolve()  # what ran (``auto`` recorded as its choice, with ``sampler_requested``)
    return {
        "model": loaded.name,
        "checkpoint": str(loaded.ckpt_path),
        "checkpoint_sha256": cached_sha256(loaded.ckpt_path, loaded.ckpt_sha256),
        "sampler": ran.sampler,
        "sampler_requested": settings.sampler,
        "spacing": ran.spacing,
        "steps": ran.steps if ran.sampler != "ddpm" else schedule.num_timesteps,
        "sampler_steps": settings.num_steps(schedule),
        "scale": settings.scale,
        "eta": ran.eta,
        "precision": str(dtype).removeprefix("torch."),
        "ldmcli_version": __version__,
    }


# ------------------------------------------------------------------------------------------ models and validation



def check_image_size(cfg: Any, height: int, width: int, name: str) -> tuple[int, int, int]:
    """The latent shape (C, H/f, W/f) for an image of ``height`` x ``width``, which must be a multiple of the
    downsampling factor f times the UNet's total downsampling (sizes above the training size run convolutionally)."""
    if height < 1 or width < 1:
        raise RequestError("size", f"size must be positive, got {height}x{width}")
    f = cfg.downsampling_factor
    levels = 2 ** (len(cfg.ldm.unet.channel_mult) - 1)
    if height % (f * levels) or width % (f * levels):
        raise RequestError("size", f"size must be multiples of {f * levels} for {name} (downsampling factor {f}, "
                           f"{levels}x inside the UNet), got {height}x{width}")
    return cfg.latent_channels, height // f, width // f


# ---------------------------------------------------------------------------------------------------- memory

GIB = 1024**3


@dataclass(frozen=True)
class MemoryNeed:
    """A lower bound on the memory one part of a run needs at its peak, and how it was counted."""

    part: str  # "UNet", "decoder" or "decoded images"
    bytes: int
    how: str


def _cgroup_memory_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def memory_limit(device: torch.device | str) -> tuple[int, str] | None:
    """The memory a run on ``device`` can use at most, and whose it is: the GPU's total memory on CUDA; otherwise
    the machine's physical memory (``SC_PHYS_PAGES``, else ``MemTotal`` in /proc/meminfo), or the cgroup's limit
    where that is lower. None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.get_device_properties(device).total_memory), f"{device} has"
        except (RuntimeError, AssertionError):
            return None
    total = None
    try:
        total = int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    cgroup = _cgroup_memory_limit()
    if cgroup is not None and (total is None or cgroup < total):
        return cgroup, "the memory limit (cgroup) is"
    return (total, "this machine has") if total else None


def estimate_memory(cfg: Any, height: int, width: int, batch: int, *, guidance: bool, itemsize: int,
                    decode_tile: int | None = None) -> list[MemoryNeed]:
    """Lower bounds on the peak memory of sampling ``batch`` images of ``height`` x ``width`` with ``cfg``, per part
    (activations only; weights come on top):

    * UNet: the skip connections it holds for its decoder half plus the widest concatenation at full latent size,
      for ``batch`` (twice that with guidance) images;
    * decoder: its two largest tensors alive together (a resolution level's input and output), for the whole
      batch, or for one tile of ``decode_tile`` latent pixels when decoding in tiles;
    * decoded images: the float32 images and their clamped copy.
    """
    f = cfg.downsampling_factor
    h, w = height // f, width // f
    unet = cfg.ldm.unet
    mc, mults = unet.model_channels, list(unet.channel_mult)
    skips = mc * mults[0] * h * w  # the input convolution
    for i, m in enumerate(mults):
        skips += unet.num_res_blocks * mc * m * (h >> i) * (w >> i)
        if i < len(mults) - 1:
            skips += mc * m * (h >> (i + 1)) * (w >> (i + 1))
    concat = mc * (mults[0] + mults[min(1, len(mults) - 1)]) * h * w
    unet_batch = batch * (2 if guidance else 1)
    per_image = skips + concat
    needs = [MemoryNeed("UNet", unet_batch * per_image * itemsize,
                        f"{unet_batch} x {per_image:,} values x {itemsize} bytes")]

    dd = cfg.first_stage.ddconfig
    th, tw = (min(height, decode_tile * f), min(width, decode_tile * f)) if decode_tile else (height, width)
    best = (0, 0, 0)
    for i, m in enumerate(dd.ch_mult):
        channels = dd.ch * (m + dd.ch_mult[min(i + 1, len(dd.ch_mult) - 1)])
        values = channels * (th >> i) * (tw >> i)
        if values > best[0]:
            best = (values, channels, i)
    values, channels, level = best
    where = f"{tw >> level} x {th >> level}" + (" (one tile)" if decode_tile and (th, tw) != (height, width) else "")
    needs.append(MemoryNeed("decoder", batch * values * itemsize,
                            f"{batch} x {channels} channels x {where} x {itemsize} bytes"))
    needs.append(MemoryNeed("decoded images", 2 * batch * 3 * height * width * 4,
                            f"2 x {batch} x 3 x {width} x {height} x 4 bytes"))
    return needs


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def check_memory(cfg: Any, height: int, width: int, batch: int, *, guidance: bool, dtype: torch.dtype,
                 device: torch.device | str, tile_decode: bool = False, tiling: bool = True,
                 limit: tuple[int, str] | None = None) -> None:
    """A request error (before any model is loaded) when the largest part of :func:`estimate_memory` exceeds
    :func:`memory_limit`, with the estimate and the limit; it suggests decoding in tiles where that would fit (and
    the caller can: ``tiling``)."""
    from ldmcli.fastpath import DEFAULT_TILE

    limit = limit if limit is not None else memory_limit(device)
    if limit is None:
        return
    available, whose = limit
    itemsize = torch.empty((), dtype=dtype).element_size()
    tile = DEFAULT_TILE if tile_decode else None
    needs = estimate_memory(cfg, height, width, batch, guidance=guidance, itemsize=itemsize, decode_tile=tile)
    worst = max(needs, key=lambda n: n.bytes)
    if worst.bytes <= available:
        return
    hint = "use a smaller size" + (" or fewer images per batch" if batch > 1 else "")
    if worst.part == "decoder" and tiling and not tile_decode:
        tiled = estimate_memory(cfg, height, width, batch, guidance=guidance, itemsize=itemsize,
                                decode_tile=DEFAULT_TILE)
        if max(n.bytes for n in tiled) <= available:
            hint = f"decode in tiles with --tile-decode ({DEFAULT_TILE * cfg.downsampling_factor} pixels square)"
    raise RequestError("size", f"{width}x{height} images need at least {_gib(worst.bytes)} for the {worst.part} "
                       f"({worst.how}) but {whose} {_gib(available)}: {hint}")


def class_range(cfg: Any) -> tuple[int, int | None]:
    """(number of real classes, null class id or None) of a class-conditional config: 1000 classes and no null class
    for upstream's cin256; otherwise the last id is the null class (cin256-v2: 1000; ``train-ldm --cond-drop``)."""
    n = int(cfg.ldm.cond_stage.params.n_classes)
    if n == 1000:
        return 1000, None
    return n - 1, n - 1


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What every generation request shares: grid layout, seed, where and how the networks run."""

    n_rows: int = 0
    seed: int | None = None
    skip_grid: bool = False
    device: str | None = None
    precision: str = "auto"
    compile: bool = False
    tile_decode: bool = False


def check_counts(counts: Sequence[tuple[str, int]], n_rows: int = 0, seed: int | None = None) -> None:
    """The cheap checks every generation request needs: each ``(field, count)`` at least 1, ``n_rows`` not
    negative, ``seed`` in the range the generator takes."""
    for name, value in counts:
        if value < 1:
            raise RequestError(name, f"{name} must be at least 1, got {value}")
    if n_rows < 0:
        raise RequestError("n_rows", f"n_rows must be >= 0, got {n_rows}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise RequestError("seed", f"seed must be between 0 and {MAX_SEED}, got {seed}")


def check_settings(settings: SamplerSettings, num_timesteps: int = 1000) -> None:
    """The sampler settings' own checks (``ValueError``) as a request error on the field they concern."""
    try:
        settings.validate(num_timesteps)
    except ValueError as e:
        text = str(e)
        field_name = next((f for f in ("steps", "eta", "scale") if text.startswith(f)), "sampler")
        raise RequestError(field_name, text) from None


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: one per non-empty line (an unreadable or empty file is a request error)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RequestError("from_file", f"from_file: cannot read {path}: {reason}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise RequestError("from_file", f"from_file: {path} holds no prompts")
    return prompts


def load_for_sampling(source: Any, device: torch.device, dtype: torch.dtype, on_event: EventHandler, *,
                      compile: bool = False) -> Any:
    """:func:`ldmcli.loading.load` on the CPU, then the inference fast path (``dtype``, layout, packed weights;
    ``compile``) onto ``device``; returns the :class:`ldmcli.loading.Loaded`."""
    from ldmcli.fastpath import prepare_for_inference
    from ldmcli.loading import load

    on_event(Message(f"loading {source.name}"))
    loaded = load(source, callback=messages(on_event), progress=downloads(on_event))
    prepare_for_inference(loaded.model, dtype=dtype, device=device, compile=compile, callback=messages(on_event))
    return loaded


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def require_diffusion(cfg: Any, name: str) -> None:
    if cfg.ldm is None:
        raise UsageError(f"{name} is a first stage (autoencoder), not a diffusion model")


def run_images(loaded: Any, jobs: Sequence[Job], *, conditioner: Conditioner, shape: Sequence[int],
               settings: SamplerSettings, outdir: Path, metadata: MetadataFn, grid_metadata: Mapping[str, Any],
               grid_per_row: int | None, decode_tile: int | None, on_event: EventHandler,
               seed: int) -> GenerationResult:
    """:func:`generate` with an :class:`ImageWriter` on ``outdir`` and the run's seed recorded in the result."""
    result = generate(loaded.model, jobs, conditioner=conditioner, shape=shape, settings=settings,
                      writer=ImageWriter(outdir), metadata=metadata, grid_metadata=grid_metadata,
                      grid_per_row=grid_per_row, device=model_device(loaded.model), decode_tile=decode_tile,
                      on_event=on_event, seed=seed)
    return result
