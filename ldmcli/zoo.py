"""The model zoo: one registry of every download of CompVis/latent-diffusion (Rombach et al., "High-Resolution Image
Synthesis with Latent Diffusion Models"; Blattmann et al., "Retrieval-Augmented Diffusion Models") plus the extra
assets those models need (BERT WordPiece vocab, CLIP ViT-L/14, LPIPS weights).

Each entry says where its files come from, where they go under the data directory (the upstream layout, see
``ldmcli.paths``), what the folder must hold when complete, which model preset (``arch``) loads it and which other
entries (assets) it needs. Lookup is :func:`get`; groups are ``first-stages``, ``ldms`` and ``all``.

Sizes are approximate (state_dict elements x 4 bytes for checkpoints, the upstream README for the rest); they are used
for ``ldm download --list`` and as a fallback for the free-space check when a server sends no Content-Length.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ldmcli import paths
from ldmcli.errors import UnknownModelError

Kind = Literal["first_stage", "ldm", "rdm", "database", "searcher", "asset", "builtin"]

OMMER = "https://ommer-lab.com/files"
HEIBOX = "https://heibox.uni-heidelberg.de"
HF = "https://huggingface.co"


@dataclass(frozen=True)
class ZooFile:
    """One download: ``url`` saved as ``filename`` in the entry's folder; an ``archive`` (zip) is extracted there."""

    url: str
    filename: str
    archive: bool = False
    md5: str | None = None
    #: full hex digest, or a prefix of at least 8 hex digits (torchvision names its weight files by one)
    sha256: str | None = None
    #: approximate size in bytes (for listings and the free-space fallback), never used to validate a download
    size: int | None = None


@dataclass(frozen=True)
class ZooEntry:
    """A zoo entry: the files to fetch, where they go (``dest``, relative to the data dir) and what must be there."""

    name: str
    kind: Kind
    dest: str
    files: tuple[ZooFile, ...]
    #: paths relative to ``dest`` that must exist for the entry to be complete
    contents: tuple[str, ...]
    #: model preset name (models only; the same as the zoo name)
    arch: str | None = None
    #: names of other entries (assets) this one needs at run time
    assets: tuple[str, ...] = ()
    #: the checkpoint file inside ``dest`` (models only)
    checkpoint: str | None = None
    #: the upstream config this entry's weights belong to (its path in the upstream repository; documentation only)
    config: str | None = None
    #: a config file of the entry's own (built-in models, entries added with :func:`register`); None: the preset
    #: ``arch`` describes the architecture
    config_path: str | None = None
    description: str = ""
    aliases: tuple[str, ...] = field(default=())
    #: shipped inside the ldmcli package (``dest`` is then relative to the package): nothing to download
    packaged: bool = False

    def local_dir(self) -> Path:
        """The entry's folder under the current data directory (resolved now; nothing is created); for a packaged
        entry, its folder inside the installed package."""
        if self.packaged:
            return _package_dir().joinpath(*self.dest.split("/"))
        return paths.data_dir().joinpath(*self.dest.split("/"))

    @property
    def approx_size(self) -> int | None:
        """Approximate total download size in bytes, or None when unknown (a packaged entry: its files' size)."""
        if self.packaged:
            folder = self.local_dir()
            return sum((folder / rel).stat().st_size for rel in self.contents if (folder / rel).is_file())
        sizes = [f.size for f in self.files]
        return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[misc]


def _package_dir() -> Path:
    """The installed ``ldmcli`` package folder (package data such as the built-in digits model lives under it)."""
    return Path(str(resources.files("ldmcli")))


def _gb(x: float) -> int:
    return int(x * 1e9)


def _first_stage(name: str, elements: int, url: str | None = None, description: str = "") -> ZooEntry:
    return ZooEntry(
        name=name,
        kind="first_stage",
        dest=f"models/first_stage_models/{name}",
        files=(ZooFile(url or f"{OMMER}/latent-diffusion/{name}.zip", "model.zip", archive=True, size=elements * 4),),
        contents=("model.ckpt",),
        arch=name,
        checkpoint="model.ckpt",
        config=f"models/first_stage_models/{name}/config.yaml",
        description=description,
    )


def _ldm_zip(name: str, zip_name: str, elements: int, description: str, assets: tuple[str, ...] = ()) -> ZooEntry:
    return ZooEntry(
        name=name,
        kind="ldm",
        dest=f"models/ldm/{name}",
        files=(ZooFile(f"{OMMER}/latent-diffusion/{zip_name}", "model.zip", archive=True, size=elements * 4),),
        contents=("model.ckpt",),
        arch=name,
        assets=assets,
        checkpoint="model.ckpt",
        config=f"models/ldm/{name}/config.yaml",
        description=description,
    )


ARTBENCH_STYLES = (
    "art_nouveau", "baroque", "expressionism", "impressionism", "post_impressionism",
    "realism", "renaissance", "romanticism", "surrealism", "ukiyo_e",
)
ARTBENCH_DATABASES = tuple(f"artbench-{s}" for s in ARTBENCH_STYLES)

CLIP_FILES = (
    ("config.json", 4_519),
    ("model.safetensors", 1_710_540_580),
    ("vocab.json", 961_143),
    ("merges.txt", 524_619),
    ("tokenizer_config.json", 905),
    ("special_tokens_map.json", 389),
    ("preprocessor_config.json", 316),
)

_ENTRIES: tuple[ZooEntry, ...] = (
    # --- first stages (scripts/download_first_stages.sh) ---
    _first_stage("kl-f4", 72_795_658, description="autoencoder KL f=4, d=3"),
    _first_stage("kl-f8", 101_137_458, description="autoencoder KL f=8, d=4"),
    _first_stage("kl-f16", 87_094_558, description="autoencoder KL f=16, d=16"),
    _first_stage("kl-f32", 121_363_726, description="autoencoder KL f=32, d=64"),
    _first_stage("vq-f4", 72_806_376, description="autoencoder VQ f=4, Z=8192, d=3"),
    _first_stage("vq-f4-noattn", 70_703_080, description="autoencoder VQ f=4, Z=8192, d=3, no attention"),
    _first_stage("vq-f8", 83_097_592, description="autoencoder VQ f=8, Z=16384, d=4"),
    _first_stage("vq-f8-n256", 85_136_377, description="autoencoder VQ f=8, Z=256, d=4"),
    _first_stage("vq-f16", 84_973_668, description="autoencoder VQ f=16, Z=16384, d=8"),
    # --- LDMs (scripts/download_models.sh) ---
    _ldm_zip("celeba256", "celeba.zip", 603_447_110, "CelebA-HQ 256 unconditional (LDM-VQ-4)"),
    _ldm_zip("ffhq256", "ffhq.zip", 603_447_110, "FFHQ 256 unconditional (LDM-VQ-4)"),
    _ldm_zip("lsun_churches256", "lsun_churches.zip", 673_599_698, "LSUN churches 256 unconditional (LDM-KL-8)"),
    _ldm_zip("lsun_beds256", "lsun_bedrooms.zip", 603_447_110, "LSUN bedrooms 256 unconditional (LDM-VQ-4)"),
    _ldm_zip("text2img256", "text2img.zip", 1_048_737_344, "Conceptual Captions text-to-image (LDM-VQ-4, BERT)",
             assets=("bert-base-uncased",)),
    _ldm_zip("cin256", "cin.zip", 858_209_689, "ImageNet class-conditional 256 (LDM-VQ-8)"),
    _ldm_zip("semantic_synthesis512", "semantic_synthesis.zip", 485_793_960,
             "landscapes segmentation-to-image, fine-tuned at 512"),
    _ldm_zip("semantic_synthesis256", "semantic_synthesis256.zip", 485_793_960, "landscapes segmentation-to-image"),
    _ldm_zip("bsr_sr", "sr_bsr.zip", 282_579_910, "OpenImages 4x super-resolution, BSR degradation (LDSR)"),
    _ldm_zip("layout2img-openimages256", "layout2img_model.zip", 606_748_038,
             "OpenImages layout-to-image (bounding-box tokens, no tokenizer)"),
    ZooEntry(
        # scripts/inpaint.py and the upstream README load models/ldm/inpainting_big/last.ckpt from heibox; the
        # ommer-lab inpainting_big.zip's contents were never verified, so the store fetches the documented last.ckpt.
        name="inpainting_big",
        kind="ldm",
        dest="models/ldm/inpainting_big",
        files=(ZooFile(f"{HEIBOX}/f/4d9ac7ea40c64582b7c9/?dl=1", "last.ckpt", size=880_942_628 * 4),),
        contents=("last.ckpt",),
        arch="inpainting_big",
        checkpoint="last.ckpt",
        config="models/ldm/inpainting_big/config.yaml",
        description="inpainting (LDM-VQ-4, masked image concat)",
    ),
    ZooEntry(
        name="txt2img-f8-large",
        kind="ldm",
        dest="models/ldm/text2img-large",
        files=(ZooFile(f"{OMMER}/latent-diffusion/nitro/txt2img-f8-large/model.ckpt", "model.ckpt", size=_gb(5.7)),),
        contents=("model.ckpt",),
        arch="txt2img-f8-large",
        assets=("bert-base-uncased",),
        checkpoint="model.ckpt",
        config="configs/latent-diffusion/txt2img-1p4B-eval.yaml",
        description="LAION-400M text-to-image, 1.45B (LDM-KL-8-G, BERT)",
        aliases=("text2img-large",),
    ),
    ZooEntry(
        name="cin256-v2",
        kind="ldm",
        dest="models/ldm/cin256-v2",
        files=(ZooFile(f"{OMMER}/latent-diffusion/nitro/cin/model.ckpt", "model.ckpt", size=456_767_873 * 4),),
        contents=("model.ckpt",),
        arch="cin256-v2",
        checkpoint="model.ckpt",
        config="configs/latent-diffusion/cin256-v2.yaml",
        description="ImageNet class-conditional 256 with a null class for classifier-free guidance",
    ),
    # --- built in: trained by ldm train-ae / train-ldm on scikit-learn's digits, shipped in the package ---
    ZooEntry(
        name="digits",
        kind="builtin",
        dest="assets/digits",
        files=(),
        contents=("model.safetensors", "config.yaml"),
        checkpoint="model.safetensors",
        config_path=str(_package_dir() / "assets" / "digits" / "config.yaml"),
        description="handwritten digits 32x32, class-conditional (10 classes + null), built in: no download",
        packaged=True,
    ),
    # --- retrieval-augmented diffusion ---
    ZooEntry(
        name="rdm768x768",
        kind="rdm",
        dest="models/rdm/rdm768x768",
        files=(ZooFile(f"{OMMER}/rdm/model.ckpt", "model.ckpt", size=2_740_583_765 * 4),),
        contents=("model.ckpt",),
        arch="rdm768x768",
        assets=("clip-vit-large-patch14",),
        checkpoint="model.ckpt",
        config="configs/retrieval-augmented-diffusion/768x768.yaml",
        description="retrieval-augmented diffusion, CLIP ViT-L/14 conditioning, f=16",
    ),
    ZooEntry(
        name="artbench-databases",
        kind="database",
        dest="data/rdm/retrieval_databases",
        files=(ZooFile(f"{OMMER}/rdm/artbench_databases.zip", "artbench.zip", archive=True, size=_gb(0.082)),),
        contents=ARTBENCH_DATABASES,
        description="ArtBench retrieval databases (CLIP image embeddings, 10 styles)",
    ),
    ZooEntry(
        name="openimages-database",
        kind="database",
        dest="data/rdm/retrieval_databases",
        files=(ZooFile(f"{OMMER}/rdm/openimages_database.zip", "openimages.zip", archive=True, size=_gb(11)),),
        contents=("openimages",),
        description="OpenImages retrieval database (CLIP image embeddings); its searcher is built locally",
    ),
    ZooEntry(
        name="artbench-searchers",
        kind="searcher",
        dest="data/rdm/searchers",
        files=(ZooFile(f"{OMMER}/rdm/artbench_searchers.zip", "artbench.zip", archive=True),),
        contents=ARTBENCH_DATABASES,
        description="ScaNN searchers for the ArtBench databases",
    ),
    # --- assets ---
    ZooEntry(
        name="bert-base-uncased",
        kind="asset",
        dest="assets/bert-base-uncased",
        files=(ZooFile(f"{HF}/bert-base-uncased/resolve/main/vocab.txt", "vocab.txt",
                       sha256="07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", size=231_508),),
        contents=("vocab.txt",),
        description="bert-base-uncased WordPiece vocab (BERTEmbedder tokenizer)",
    ),
    ZooEntry(
        name="clip-vit-large-patch14",
        kind="asset",
        dest="assets/clip-vit-large-patch14",
        files=tuple(
            ZooFile(f"{HF}/openai/clip-vit-large-patch14/resolve/main/{name}", name, size=size)
            for name, size in CLIP_FILES
        ),
        contents=tuple(name for name, _ in CLIP_FILES),
        description="CLIP ViT-L/14 (transformers CLIPModel/CLIPTokenizer files) for the RDM",
    ),
    ZooEntry(
        name="lpips",
        kind="asset",
        dest="assets/lpips",
        files=(
            ZooFile(f"{HEIBOX}/f/607503859c864bc1b30b/?dl=1", "vgg.pth", md5="d507d7349b931f0638a25a48a722f98a",
                    size=7_289),
            ZooFile("https://download.pytorch.org/models/vgg16-397923af.pth", "vgg16-397923af.pth",
                    sha256="397923af", size=553_433_881),
        ),
        contents=("vgg.pth", "vgg16-397923af.pth"),
        description="LPIPS linear-layer weights and torchvision's VGG16 ImageNet backbone (autoencoder training)",
    ),
    ZooEntry(
        # torch-fidelity's port of the TF Inception that FID/IS/KID/precision-recall are defined on (ldm eval);
        # the file name carries its sha256 prefix, as torch hub names go
        name="inception",
        kind="asset",
        dest="assets/inception",
        files=(ZooFile("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                       "weights-inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth",
                       sha256="6726825d", size=95_700_000),),
        contents=("weights-inception-2015-12-05-6726825d.pth",),
        description="Inception-v3 of the TF FID/IS reference (torch-fidelity's weights) for ldm eval",
    ),
)

REGISTRY: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}

GROUPS: dict[str, tuple[str, ...]] = {
    "first-stages": tuple(e.name for e in _ENTRIES if e.kind == "first_stage"),
    "ldms": tuple(e.name for e in _ENTRIES if e.kind == "ldm"),
    "all": tuple(e.name for e in _ENTRIES),
}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _lookup_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for entry in REGISTRY.values():
        for alias in (entry.name, *entry.aliases):
            table[_normalise(alias)] = entry.name
    return table


def names() -> list[str]:
    """Every entry name, in registry order (``REGISTRY`` is the one source; tests may add entries to it)."""
    return list(REGISTRY)


def entries() -> list[ZooEntry]:
    """Every entry, in registry order."""
    return list(REGISTRY.values())


def _unknown(name: str) -> UnknownModelError:
    candidates = {_normalise(c): c for c in [*names(), *GROUPS]}
    close = [candidates[c] for c in difflib.get_close_matches(_normalise(name), list(candidates), n=3, cutoff=0.5)]
    hint = f"; did you mean {', '.join(close)}?" if close else "; see 'ldm download --list'"
    return UnknownModelError(f"unknown model '{name}'{hint}")


def get(name: str) -> ZooEntry:
    """The zoo entry called ``name`` (case and ``-``/``_`` insensitive, upstream aliases accepted).

    Raises :class:`ldmcli.errors.UnknownModelError` (one line, with close matches) for anything else.
    """
    if name in REGISTRY:
        return REGISTRY[name]
    real = _lookup_table().get(_normalise(name))
    if real is None:
        raise _unknown(name)
    return REGISTRY[real]


def register(entry: ZooEntry, *, replace: bool = False) -> ZooEntry:
    """Add an entry to the registry (a model of your own that commands then take by name, as the zoo's).

    Its architecture comes from ``entry.config_path`` (a config file) or ``entry.arch`` (a preset name). A name
    already taken is a ValueError unless ``replace``.
    """
    if entry.name in REGISTRY and not replace:
        raise ValueError(f"zoo entry {entry.name!r} already exists")
    REGISTRY[entry.name] = entry
    return entry


def entry_config(entry: ZooEntry) -> Any:
    """The model config (:class:`ldmcli.config.ModelConfig`) of a model entry: its own config file when it has one,
    else its preset."""
    from ldmcli import config

    if entry.config_path is not None:
        return config.load_config(Path(entry.config_path))
    return config.load_config(entry.arch or entry.name)


def expand(names_or_groups: list[str] | tuple[str, ...]) -> list[ZooEntry]:
    """Entries for a list of names and group names (``first-stages``, ``ldms``, ``all``), duplicates removed."""
    out: dict[str, ZooEntry] = {}
    for item in names_or_groups:
        group = GROUPS.get(_normalise(item))
        for name in group if group is not None else (get(item).name,):
            out.setdefault(name, REGISTRY[name])
    return list(out.values())
