"""``ldm knn2img``: images from the Retrieval-Augmented Diffusion Model (upstream ``scripts/knn2img.py``),
conditioned on the CLIP embedding of a prompt (or, beyond upstream, of an image) and optionally on its nearest
neighbours in a retrieval database. Options, output layout and guarantees as ``ldm txt2img``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from ldmcli.commands import _common as opts
from ldmcli.commands.build_index import PHASES
from ldmcli.commands.txt2img import (RunDisplay, check_counts, load_for_sampling, net_device, pick_sampler,
                                     read_prompt_file, run_generation)
from ldmcli.errors import UsageError

DEFAULT_MODEL = "rdm768x768"
CLIP_ASSET = "clip-vit-large-patch14"


def _check_rdm(cfg: Any, name: str, clip_dim: int | None = None) -> None:
    """An RDM-like config: an identity conditioner and cross-attention (as wide as the CLIP embeddings)."""
    ldm = getattr(cfg, "ldm", None)
    if ldm is None or ldm.cond_stage.type != "identity" or ldm.unet.context_dim is None:
        raise UsageError(f"{name} is not a retrieval-augmented model (it needs an identity conditioner with "
                         f"cross-attention over CLIP embeddings, as rdm768x768)")
    if clip_dim is not None and ldm.unet.context_dim != clip_dim:
        raise UsageError(f"{name} attends over {ldm.unet.context_dim}-d contexts but the CLIP model gives "
                         f"{clip_dim}-d embeddings")


def _clip_dim(clip_dir: Path) -> int:
    try:
        return int(json.loads((Path(clip_dir) / "config.json").read_text())["projection_dim"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"cannot read the CLIP config in {clip_dir}: {e}") from None


def knn2img_command(
    prompt_arg: Optional[str] = typer.Argument(None, metavar="[PROMPT]", help="The prompt to render.",
                                               show_default=False),
    prompt_opt: opts.PromptOption = None,
    from_file: opts.FromFileOption = None,
    image: Optional[Path] = typer.Option(None, "--image", help="Use this image's CLIP embedding as the query and "
                                         "conditioning instead of a prompt (image variations).", show_default=False),
    use_neighbors: bool = typer.Option(False, "--use-neighbors", "--use_neighbors",
                                       help="Add the query's nearest neighbours in --database to the conditioning."),
    knn: int = typer.Option(10, "--knn", help="Neighbours to add (1 to 20), with --use-neighbors."),
    database: str = typer.Option("artbench-surrealism", "--database", help="Retrieval database (openimages, "
                                 "artbench-<style>, a database name or a folder of .npz), with --use-neighbors."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Zoo name of a retrieval-augmented model."),
    config: opts.ConfigOption = None,
    ckpt: opts.CkptOption = None,
    outdir: opts.OutdirOption = Path("outputs/knn2img-samples"),
    ddim_steps: opts.StepsOption = 50,
    plms: opts.PlmsOption = False,
    sampler: Optional[str] = typer.Option(None, "--sampler", help="ddim, plms, dpmpp (DPM-Solver++(2M)) or ddpm "
                                          "(default: ddim).", show_default=False),
    ddim_eta: opts.EtaOption = 0.0,
    n_iter: opts.NIterOption = 1,
    height: int = typer.Option(768, "--H", help="Image height in pixels (the latent is [16, H/16, W/16])."),
    width: int = typer.Option(768, "--W", help="Image width in pixels."),
    n_samples: opts.NSamplesOption = 3,
    n_rows: int = typer.Option(0, "--n_rows", "--n-rows", help="Images per grid row (default: n_samples)."),
    scale: float = typer.Option(5.0, "--scale", help="Classifier-free guidance scale against a zero context "
                                "(upstream's unconditional input); 1 disables guidance."),
    seed: opts.PromptSeedOption = None,
    skip_grid: opts.SkipGridOption = False,
    clip_path: Optional[Path] = typer.Option(None, "--clip", help="A transformers CLIP folder (default: the store's "
                                             "clip-vit-large-patch14).", show_default=False),
    device: opts.DeviceOption = None,
    precision: str = typer.Option("auto", "--precision", help="fp32, bf16, fp16 or auto for the diffusion model "
                                  "(CLIP always runs in fp32)."),
    as_json: opts.JsonOption = False,
    quiet: opts.QuietOption = False,
) -> None:
    """Generate images with the retrieval-augmented diffusion model (rdm768x768), as upstream's scripts/knn2img.py.

    The conditioning is the prompt's CLIP ViT-L/14 text embedding (or --image's image embedding), with
    --use-neighbors followed by its --knn nearest neighbours in --database. Writes OUTDIR/samples/00000.png, ...
    and OUTDIR/grid-0000.png; numbering continues after existing files and every PNG records its settings.
    """
    from ldmcli import generate as gen
    from ldmcli.devices import pick_device, resolve_precision
    from ldmcli.models.clip import ClipEncoder, load_image, resolve_clip_dir
    from ldmcli.retrieval.conditioning import MAX_KNN, RdmConditioner
    from ldmcli.retrieval.database import inspect_database, load_database, resolve_database
    from ldmcli.retrieval.searcher import BRUTE_FORCE_BELOW, Retriever, searcher_dir

    # ---- everything cheap is checked before any model is loaded
    given = [n for n, v in (("PROMPT", prompt_arg), ("--prompt", prompt_opt), ("--from-file", from_file),
                            ("--image", image)) if v is not None]
    if len(given) > 1:
        raise UsageError(f"give one of PROMPT, --prompt, --from-file and --image, not {' and '.join(given)}")
    if not given:
        raise UsageError("give a PROMPT (or --prompt TEXT, --from-file FILE, or --image PATH)")
    check_counts((("--n_samples", n_samples), ("--n_iter", n_iter)), n_rows, seed)
    if use_neighbors and not 1 <= knn <= MAX_KNN:
        raise UsageError(f"--knn must be between 1 and {MAX_KNN}, got {knn}")
    images: dict[str, Any] = {}
    if from_file is not None:
        items = read_prompt_file(from_file)
    elif image is not None:
        images[str(image)] = load_image(image)  # an unreadable image is a UsageError here
        items = [str(image)] * n_samples
    else:
        text = prompt_arg if prompt_arg is not None else prompt_opt
        if not text.strip():
            raise UsageError("the prompt is empty")
        items = [text] * n_samples
    settings = gen.SamplerSettings(pick_sampler(sampler, plms), ddim_steps, ddim_eta, scale)
    settings.validate()
    source = gen.resolve_model(None if config is not None else model, config, ckpt)
    if source.config is not None:
        _check_rdm(source.config, source.name)
        shape = gen.check_image_size(source.config, height, width, source.name)
        settings.validate(source.config.ldm.timesteps)
    db_name = db_folder = None
    if use_neighbors:
        db_name, db_folder = resolve_database(database, fetch=False) if not _known_missing(database) else \
            (database, None)
    dev = pick_device(device)
    dtype = resolve_precision(precision, dev)

    with RunDisplay(as_json=as_json, quiet=quiet) as display:
        seen: set[str] = set()

        def phase(name: str, done: int, total: int) -> None:
            if name not in seen:
                seen.add(name)
                display.message(PHASES.get(name, name))

        clip_dir = resolve_clip_dir(clip_path) if clip_path is not None else _store_clip(display)
        clip_dim = _clip_dim(clip_dir)
        if source.config is not None:
            _check_rdm(source.config, source.name, clip_dim)
        retriever = None
        if use_neighbors:
            if db_folder is None:  # one of upstream's databases, not downloaded yet
                db_name, db_folder = resolve_database(database, progress=display.download)
            info = inspect_database(db_folder, name=db_name, expected_dim=clip_dim)
            if knn > len(info):
                raise UsageError(f"--knn {knn} is larger than database '{db_name}' ({len(info)} points)")
            if not (searcher_dir(db_name) / "scann_config.pb").is_file() and len(info) >= BRUTE_FORCE_BELOW:
                raise UsageError(f"database '{db_name}' has {len(info)} points and no searcher; build one first "
                                 f"with 'ldm build-index {db_name}'")
            db = load_database(db_folder, name=db_name, expected_dim=clip_dim, callback=phase)
            retriever = Retriever.for_database(db, callback=phase)

        net = load_for_sampling(source, dev, dtype, display)
        cfg = net.ldm_config
        _check_rdm(cfg, source.name, clip_dim)
        shape = gen.check_image_size(cfg, height, width, source.name)
        settings.validate(net.num_timesteps)
        display.message("loading CLIP")
        clip = ClipEncoder.from_pretrained(clip_dir, device=net_device(net))
        conditioner = RdmConditioner(clip, scale=scale, retriever=retriever, knn=knn if use_neighbors else 0,
                                     images=images)
        run_seed = gen.shared_seed(seed, gen.Distributed())
        jobs = gen.plan_jobs(items, n_samples, n_iter, run_seed)
        base = {"command": "knn2img", **gen.base_metadata(net, source.name, settings, dtype), "height": height,
                "width": width, "base_seed": run_seed, "use_neighbors": use_neighbors,
                "database": db_name if use_neighbors else None, "knn": knn if use_neighbors else 0}

        def metadata(job: Any, k: int) -> dict[str, Any]:
            item = job.items[k]
            record = {**base, "prompt": None if image is not None else item,
                      "image": item if image is not None else None, "seed": job.seeds[k],
                      "prompt_index": job.item_indices[k] if from_file is not None else 0,
                      "iteration": job.iteration}
            if use_neighbors:
                record["neighbors"] = conditioner.neighbours_of(item)
            return record

        grid_meta = {**base, "prompts": sorted(set(items)) if image is None else [],
                     "image": str(image) if image is not None else None,
                     "seeds": [s for j in jobs for s in j.seeds]}
        writer = gen.ImageWriter(outdir)
        run_generation(display, outdir, run_seed, lambda: gen.generate(
            net, jobs, conditioner=conditioner, shape=shape, settings=settings, writer=writer, metadata=metadata,
            grid_metadata=grid_meta, grid_per_row=None if skip_grid else (n_rows or n_samples),
            device=net_device(net), callback=display.event))


def _known_missing(database: str) -> bool:
    """True for one of upstream's databases that is not downloaded yet (fetched later, with progress)."""
    from ldmcli import paths
    from ldmcli.retrieval.database import KNOWN_DATABASES

    return database in KNOWN_DATABASES and not (paths.databases_dir() / database).is_dir()


def _store_clip(display: RunDisplay) -> Path:
    from ldmcli import store

    return store.ensure(CLIP_ASSET, progress=display.download)


def register(app: typer.Typer) -> None:
    app.command("knn2img")(knn2img_command)
