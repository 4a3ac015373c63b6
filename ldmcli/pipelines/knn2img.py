"""Retrieval-augmented generation (upstream ``scripts/knn2img.py``): the RDM conditioned on the CLIP embedding of a
prompt (or, beyond upstream, of an image) and optionally on its nearest neighbours in a retrieval database.
:func:`run` does what ``ldm knn2img`` does, from Python."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ldmcli.errors import RequestError, UsageError
from ldmcli.output import check_output_folder
from ldmcli.pipelines import generation as gen
from ldmcli.pipelines.events import EventHandler, Message, downloads, ignore
from ldmcli.sampling import SamplerSettings

DEFAULT_MODEL = "rdm768x768"
CLIP_ASSET = "clip-vit-large-patch14"


@dataclass(frozen=True, kw_only=True)
class Knn2ImgRequest(gen.RunOptions):
    """One run. ``prompts`` as :class:`ldmcli.pipelines.txt2img.Txt2ImgRequest`; or ``image``: that image's CLIP
    embedding is the query (image variations). ``use_neighbors`` adds the query's ``knn`` nearest neighbours in
    ``database`` to the conditioning."""

    prompts: Sequence[str] = ()
    image: Path | None = None
    from_file: bool = False
    use_neighbors: bool = False
    knn: int = 10
    database: str = "artbench-surrealism"
    model: str = DEFAULT_MODEL
    config: Path | None = None
    ckpt: Path | None = None
    outdir: Path = Path("outputs/knn2img-samples")
    settings: SamplerSettings = SamplerSettings("ddim", 50, 0.0, 5.0)
    n_samples: int = 3
    n_iter: int = 1
    height: int = 768
    width: int = 768
    clip: Path | None = None
    quiet: bool = False  # silence libraries' own progress bars and notices (transformers' weight loading)


@contextlib.contextmanager
def quiet_transformers(quiet: bool = True) -> Iterator[None]:
    """While ``quiet``: no transformers progress bar ("Loading weights") and only its errors, restored afterwards."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def check_rdm(cfg: Any, name: str, clip_dim: int | None = None) -> None:
    """An RDM-like config: an identity conditioner and cross-attention (as wide as the CLIP embeddings)."""
    ldm = getattr(cfg, "ldm", None)
    if ldm is None or ldm.cond_stage.type != "identity" or ldm.unet.context_dim is None:
        raise UsageError(f"{name} is not a retrieval-augmented model (it needs an identity conditioner with "
                         f"cross-attention over CLIP embeddings, as rdm768x768)")
    if clip_dim is not None and ldm.unet.context_dim != clip_dim:
        raise UsageError(f"{name} attends over {ldm.unet.context_dim}-d contexts but the CLIP model gives "
                         f"{clip_dim}-d embeddings")


def clip_dim(clip_dir: Path) -> int:
    try:
        return int(json.loads((Path(clip_dir) / "config.json").read_text())["projection_dim"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"cannot read the CLIP config in {clip_dir}: {e}") from None


def _known_missing(database: str) -> bool:
    """True for one of upstream's databases that is not downloaded yet (fetched later, with progress)."""
    from ldmcli import paths
    from ldmcli.retrieval.database import KNOWN_DATABASES

    return database in KNOWN_DATABASES and not (paths.databases_dir() / database).is_dir()


@dataclass(frozen=True)
class _Checked:
    source: Any
    items: list[str]
    images: dict[str, Any]
    db_name: str | None
    db_folder: Path | None


def check(request: Knn2ImgRequest) -> _Checked:
    """Every check that needs no weights (the image is read here: a bad one fails before any model loads)."""
    from ldmcli.loading import resolve
    from ldmcli.models.clip import load_image
    from ldmcli.retrieval.conditioning import MAX_KNN
    from ldmcli.retrieval.database import resolve_database

    gen.check_counts((("n_samples", request.n_samples), ("n_iter", request.n_iter)), request.n_rows, request.seed)
    if request.use_neighbors and not 1 <= request.knn <= MAX_KNN:
        raise RequestError("knn", f"knn must be between 1 and {MAX_KNN}, got {request.knn}")
    images: dict[str, Any] = {}
    if request.image is not None:
        images[str(request.image)] = load_image(request.image)
        items = [str(request.image)] * request.n_samples
    elif request.from_file:
        items = list(request.prompts)
    else:
        if not request.prompts or not request.prompts[0].strip():
            raise RequestError("prompts", "the prompt is empty")
        items = [request.prompts[0]] * request.n_samples
    gen.check_settings(request.settings)
    source = resolve(request.model, config=request.config, ckpt=request.ckpt)
    if source.config is not None:
        check_rdm(source.config, source.name)
        gen.check_image_size(source.config, request.height, request.width, source.name)
        gen.check_settings(request.settings, source.config.ldm.timesteps)
    check_output_folder(request.outdir)
    db_name = db_folder = None
    if request.use_neighbors:
        if _known_missing(request.database):
            db_name = request.database
        else:
            db_name, db_folder = resolve_database(request.database, fetch=False)
    return _Checked(source, items, images, db_name, db_folder)


def run(request: Knn2ImgRequest, on_event: EventHandler = ignore) -> gen.GenerationResult:
    """Check (and the memory the size needs), load CLIP, the database and the RDM, then sample, decode and write
    every image. Under ``torchrun`` the batches are dealt to the ranks (each process loads its own searcher)."""
    from ldmcli import store
    from ldmcli.devices import pick_device, resolve_precision
    from ldmcli.fastpath import DEFAULT_TILE
    from ldmcli.models.clip import ClipEncoder, resolve_clip_dir
    from ldmcli.retrieval.build import PHASES
    from ldmcli.retrieval.conditioning import RdmConditioner
    from ldmcli.retrieval.database import inspect_database, load_database, resolve_database
    from ldmcli.retrieval.searcher import BRUTE_FORCE_BELOW, Retriever, has_searcher, searcher_dir

    checked = check(request)
    source, db_name, db_folder = checked.source, checked.db_name, checked.db_folder
    dev = pick_device(request.device)
    dtype = resolve_precision(request.precision, dev)
    if source.config is not None:
        gen.check_memory(source.config, request.height, request.width, min(request.n_samples, len(checked.items)),
                         guidance=request.settings.scale != 1.0, dtype=dtype, device=dev,
                         tile_decode=request.tile_decode, tiling=False)  # ldm knn2img has no --tile-decode
    seen: set[str] = set()

    def phase(name: str, done: int, total: int) -> None:
        if name not in seen:
            seen.add(name)
            on_event(Message(PHASES.get(name, name)))

    with gen.distributed(dev) as env:
        clip_dir = resolve_clip_dir(request.clip if request.clip is not None else
                                    store.ensure(CLIP_ASSET, progress=downloads(on_event)))
        dim = clip_dim(clip_dir)
        if source.config is not None:
            check_rdm(source.config, source.name, dim)
        retriever = None
        if request.use_neighbors:
            if db_folder is None:  # one of upstream's databases, not downloaded yet
                db_name, db_folder = resolve_database(request.database, progress=downloads(on_event))
            info = inspect_database(db_folder, name=db_name, expected_dim=dim)
            if request.knn > len(info):
                raise RequestError("knn", f"knn {request.knn} is larger than database '{db_name}' "
                                   f"({len(info)} points)")
            if not has_searcher(searcher_dir(db_name)) and len(info) >= BRUTE_FORCE_BELOW:
                raise UsageError(f"database '{db_name}' has {len(info)} points and no searcher; build one first "
                                 f"with 'ldm build-index {db_name}'")
            db = load_database(db_folder, name=db_name, expected_dim=dim, callback=phase)
            retriever = Retriever.for_database(db, callback=phase)

        loaded = gen.load_for_sampling(source, gen.rank_device(dev, env), dtype, on_event, compile=request.compile)
        cfg, net = loaded.config, loaded.model
        check_rdm(cfg, source.name, dim)
        shape = gen.check_image_size(cfg, request.height, request.width, source.name)
        gen.check_settings(request.settings, net.num_timesteps)
        on_event(Message("loading CLIP"))
        with quiet_transformers(request.quiet):
            clip = ClipEncoder.from_pretrained(clip_dir, device=gen.model_device(net))
        knn = request.knn if request.use_neighbors else 0
        conditioner = RdmConditioner(clip, scale=request.settings.scale, retriever=retriever, knn=knn,
                                     images=checked.images)
        run_seed = gen.shared_seed(request.seed, env)
        jobs = gen.rank_jobs(gen.plan_jobs(checked.items, request.n_samples, request.n_iter, run_seed), env.rank,
                             env.world_size)
        image = request.image
        base = {"command": "knn2img", **gen.base_metadata(loaded, request.settings, dtype), "height": request.height,
                "width": request.width, "base_seed": run_seed, "use_neighbors": request.use_neighbors,
                "database": db_name if request.use_neighbors else None, "knn": knn}

        def metadata(job: Any, k: int) -> dict[str, Any]:
            item = job.items[k]
            record = {**base, "prompt": None if image is not None else item,
                      "image": item if image is not None else None, "seed": job.seeds[k],
                      "prompt_index": job.item_indices[k] if request.from_file else 0, "iteration": job.iteration}
            if request.use_neighbors:
                record["neighbors"] = conditioner.neighbours_of(item)
            return record

        grid_meta = {**base, "prompts": sorted(set(checked.items)) if image is None else [],
                     "image": str(image) if image is not None else None, "seeds": [s for j in jobs for s in j.seeds]}
        return gen.run_images(loaded, jobs, conditioner=conditioner, shape=shape, settings=request.settings,
                              outdir=request.outdir, metadata=metadata, grid_metadata=grid_meta,
                              grid_per_row=None if request.skip_grid else (request.n_rows or request.n_samples),
                              decode_tile=DEFAULT_TILE if request.tile_decode else None, on_event=on_event,
                              seed=run_seed)
