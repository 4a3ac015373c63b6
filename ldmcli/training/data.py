"""Training data: a folder of images, and the dataset layouts of the upstream training configs.

Every dataset returns upstream's example dicts: ``image`` as an ``h w c`` float32 array in [-1, 1] (the models'
``get_input`` rearranges it), plus ``class_label`` / ``human_label`` / ``caption`` where the data has them, and the
``index`` of the example. Images are centre-cropped to a square and resized to ``size`` (the score-sde
preprocessing upstream's LSUN loader uses). Random flips are drawn from a per-example seed the sampler hands out, so
a resumed run sees exactly the data an uninterrupted one would (:class:`ResumableSampler`).
"""

from __future__ import annotations

import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ldmcli.errors import LdmError, UsageError
from ldmcli.fileio import atomic_write_text
from ldmcli.images import ImageReadError, read_rgb, supported_mode
from ldmcli.training.events import Progress, TrainEvent

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
}


class DataError(LdmError):
    """Training data that cannot be used: a missing folder, an empty dataset, an unprepared layout."""


@dataclass
class ScanReport:
    """What building a dataset found: usable examples, and the files it skipped and why."""

    found: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    missing_captions: int = 0


def _natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def load_square_image(path: str | os.PathLike, size: int | None, interpolation: str = "bicubic",
                      flip: bool = False) -> np.ndarray:
    """Read an image as RGB (:func:`ldmcli.images.read_rgb`: 16-bit scaled, transparency over white), centre-crop
    the largest square, resize to ``size`` and scale to [-1, 1] (``h w c``)."""
    with Image.fromarray(read_rgb(path)) as im:
        w, h = im.size
        crop = min(w, h)
        left, top = (w - crop) // 2, (h - crop) // 2
        im = im.crop((left, top, left + crop, top + crop))
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), resample=INTERPOLATIONS[interpolation])
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(im, dtype=np.uint8)
    return (arr / 127.5 - 1.0).astype(np.float32)


def _flip_for(item_seed: int | None, flip_p: float) -> bool:
    return flip_p > 0 and item_seed is not None and random.Random(item_seed).random() < flip_p


def _split_key(key: int | tuple[int, int]) -> tuple[int, int | None]:
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(key), None


class ImagePathsDataset:
    """Images from a list of paths with optional per-example labels and captions."""

    def __init__(self, paths: Sequence[str], *, size: int | None, labels: Sequence[int] | None = None,
                 human_labels: Sequence[str] | None = None, captions: Sequence[str] | None = None,
                 interpolation: str = "bicubic", flip_p: float = 0.0,
                 loader: Callable[..., np.ndarray] = load_square_image) -> None:
        self.paths = list(paths)
        self.size = size
        self.labels = list(labels) if labels is not None else None
        self.human_labels = list(human_labels) if human_labels is not None else None
        self.captions = list(captions) if captions is not None else None
        self.interpolation = interpolation
        self.flip_p = flip_p
        self.loader = loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i, item_seed = _split_key(key)
        path = self.paths[i]
        try:
            image = self.loader(path, self.size, self.interpolation, _flip_for(item_seed, self.flip_p))
        except ImageReadError as e:
            raise DataError(f"training data: {e}") from None
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"cannot read training image {path}: {e}") from None
        example: dict[str, Any] = {"image": image, "index": i, "file_path_": str(path)}
        if self.labels is not None:
            example["class_label"] = self.labels[i]
        if self.human_labels is not None:
            example["human_label"] = self.human_labels[i]
        if self.captions is not None:
            example["caption"] = self.captions[i]
        return example


class ImageFolder(ImagePathsDataset):
    """Every image under ``root`` (recursive, sorted). Class labels come from the first-level sub-folder names
    (numeric order when all are numbers, else alphabetical); captions from a same-named ``.txt`` next to each
    image. Unreadable images are skipped and listed in :attr:`report`."""

    def __init__(self, root: str | os.PathLike, size: int, *, interpolation: str = "bicubic", flip_p: float = 0.0,
                 labels: bool = True, captions: bool = True, verify: bool = True) -> None:
        root = Path(root).expanduser()
        if not root.exists():
            raise DataError(f"data folder {root} does not exist")
        if not root.is_dir():
            raise DataError(f"data folder {root} is not a folder")
        report = ScanReport()
        files = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                       key=lambda p: _natural_key(p.relative_to(root).as_posix()))
        good: list[Path] = []
        for p in files:
            if verify:
                try:
                    with Image.open(p) as im:
                        mode = im.mode
                        im.verify()
                except Exception as e:  # PIL raises many types for broken files
                    report.skipped.append((str(p), f"{type(e).__name__}: {e}".strip()))
                    continue
                if not supported_mode(mode):
                    report.skipped.append((str(p), f"unsupported pixel format (PIL mode {mode})"))
                    continue
            good.append(p)
        if not good:
            extra = f" ({len(report.skipped)} unreadable)" if report.skipped else ""
            raise DataError(f"no usable images under {root}{extra}; expected {', '.join(IMAGE_SUFFIXES)} files")
        report.found = len(good)

        class_label_list = None
        self.class_names: list[str] = []
        if labels:
            tops = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in good]
            names = sorted({t for t in tops if t is not None},
                           key=lambda n: (0, int(n), n) if n.isdigit() else (1, 0, n))
            if names and None not in tops:
                self.class_names = names
                index = {n: k for k, n in enumerate(names)}
                class_label_list = [index[t] for t in tops]
        caption_list = None
        if captions:
            caption_list = []
            for p in good:
                txt = p.with_suffix(".txt")
                if txt.is_file():
                    caption_list.append(txt.read_text(encoding="utf-8").strip())
                else:
                    caption_list.append("")
                    report.missing_captions += 1
        super().__init__([str(p) for p in good], size=size, labels=class_label_list,
                         human_labels=[self.class_names[k] for k in class_label_list] if class_label_list else None,
                         captions=caption_list, interpolation=interpolation, flip_p=flip_p)
        self.root = root
        self.report = report


def _read_list(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{what}: file list {path} not found")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{what}: file list {path} is empty")
    return lines


# --- LSUN (upstream ldm/data/lsun.py): file lists under data/lsun, images under data/lsun/<subset>/ ------------

LSUN_SPLITS = {
    "churches": ("church_outdoor_train.txt", "church_outdoor_val.txt"),
    "bedrooms": ("bedrooms_train.txt", "bedrooms_val.txt"),
    "cats": ("cat_train.txt", "cat_val.txt"),
}


def lsun(subset: str, split: str, *, size: int | None = None, root: str = "data/lsun",
         interpolation: str = "bicubic", flip_p: float | None = None) -> ImagePathsDataset:
    """LSUN as upstream lays it out: ``<root>/<list>.txt`` of paths relative to ``<root>/<subset>/``."""
    root_p = Path(root).expanduser()
    train_list, val_list = LSUN_SPLITS[subset]
    rels = _read_list(root_p / (train_list if split == "train" else val_list), f"LSUN {subset}")
    flip = (0.5 if split == "train" else 0.0) if flip_p is None else flip_p
    return ImagePathsDataset([str(root_p / subset / r) for r in rels], size=size, interpolation=interpolation,
                             flip_p=flip)


# --- CelebA-HQ and FFHQ (taming-transformers taming/data/faceshq.py) ------------------------------------------

def _load_npy_image(path: str, size: int | None, interpolation: str, flip: bool) -> np.ndarray:
    arr = np.load(path, allow_pickle=False)
    arr = arr.squeeze(0) if arr.ndim == 4 else arr  # 1 x 3 x H x W as distributed
    if arr.shape[0] == 3:
        arr = np.transpose(arr, (1, 2, 0))
    im = Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8)), mode="RGB")
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), resample=INTERPOLATIONS[interpolation])
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return (np.asarray(im, dtype=np.uint8) / 127.5 - 1.0).astype(np.float32)


def faces(name: str, split: str, *, size: int | None = None, root: str = "data",
          interpolation: str = "bicubic", flip_p: float = 0.0) -> ImagePathsDataset:
    """CelebA-HQ (``<root>/celebahq/*.npy`` listed in ``<root>/celebahq{train,validation}.txt``) or FFHQ
    (``<root>/ffhq/*.png`` listed in ``<root>/ffhq{train,validation}.txt``)."""
    root_p = Path(root).expanduser()
    rels = _read_list(root_p / f"{name}{'train' if split == 'train' else 'validation'}.txt", name)
    loader = _load_npy_image if name == "celebahq" else load_square_image
    return ImagePathsDataset([str(root_p / name / r) for r in rels], size=size, interpolation=interpolation,
                             flip_p=flip_p, loader=loader)


# --- ImageNet (upstream ldm/data/imagenet.py) --------------------------------------------------------------------

IMAGENET = {
    "train": ("ILSVRC2012_train", "ILSVRC2012_img_train.tar"),
    "validation": ("ILSVRC2012_validation", "ILSVRC2012_img_val.tar"),
}
VALIDATION_SYNSET_URL = "https://heibox.uni-heidelberg.de/f/3e0f6e9c624e45f2bd73/?dl=1"


def imagenet_root(split: str, data_root: str | os.PathLike | None = None) -> Path:
    """``<data_root>/ILSVRC2012_<split>``, by default under ``${XDG_CACHE_HOME:-~/.cache}/autoencoders/data``."""
    if data_root is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        data_root = Path(cache) / "autoencoders" / "data"
    return Path(data_root).expanduser() / IMAGENET[split][0]


def _extract(tar_path: Path, dest: Path) -> None:
    with tarfile.open(tar_path, "r:*") as tar:
        tar.extractall(dest, filter="data")


def prepare_imagenet(split: str, data_root: str | os.PathLike | None = None,
                     callback: Progress | None = None) -> Path:
    """Extract ``ILSVRC2012_img_{train,val}.tar`` placed in the split's folder into ``data/`` (train: one folder
    per synset from the per-class tars; validation: sorted into synset folders with ``validation_synset.txt``),
    write ``filelist.txt`` and the ``.ready`` marker. Returns the split's root. A prepared split is left alone."""
    root = imagenet_root(split, data_root)
    if (root / ".ready").exists():
        return root
    datadir = root / "data"
    if not datadir.exists():
        tar_path = root / IMAGENET[split][1]
        if not tar_path.is_file():
            raise DataError(f"ImageNet {split} is not prepared: place {IMAGENET[split][1]} in {root} "
                            "(the academic-torrents download is not automated)")
        synsets_txt = root / "validation_synset.txt"
        if split == "validation" and not synsets_txt.is_file():
            raise DataError(f"ImageNet validation needs {synsets_txt} (download it from {VALIDATION_SYNSET_URL})")
        partial = root / "data.partial"
        if partial.exists():
            import shutil

            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        if callback:
            callback(TrainEvent("extract", path=str(tar_path)))
        _extract(tar_path, partial)
        if split == "train":
            for sub in sorted(partial.glob("*.tar")):
                subdir = sub.with_suffix("")
                subdir.mkdir(exist_ok=True)
                _extract(sub, subdir)
                sub.unlink()
        else:
            mapping = dict(line.split() for line in synsets_txt.read_text().splitlines() if line.strip())
            for fname, synset in mapping.items():
                (partial / synset).mkdir(exist_ok=True)
                src = partial / fname
                if src.exists():
                    os.replace(src, partial / synset / fname)
        os.replace(partial, datadir)
    files = sorted(p.relative_to(datadir).as_posix() for p in datadir.glob("*/*.JPEG"))
    if not files:
        raise DataError(f"ImageNet {split}: no .JPEG files under {datadir}")
    atomic_write_text(root / "filelist.txt", "\n".join(files) + "\n")
    (root / ".ready").touch()
    return root


def imagenet(split: str, *, size: int = 256, data_root: str | None = None, interpolation: str = "bicubic",
             flip_p: float = 0.0, callback: Progress | None = None) -> ImagePathsDataset:
    """ImageNet with upstream's labels: the index of the synset among the sorted synsets of the file list."""
    root = prepare_imagenet(split, data_root, callback)
    rels = [r for r in _read_list(root / "filelist.txt", f"ImageNet {split}")
            if r.split("/")[-1] != "n06596364_9591.JPEG"]  # upstream's ignore list
    synsets = [r.split("/")[0] for r in rels]
    index = {s: k for k, s in enumerate(sorted(set(synsets)))}
    human = None
    human_txt = root / "synset_human.txt"
    if human_txt.is_file():
        names = dict(line.split(maxsplit=1) for line in human_txt.read_text().splitlines() if line.strip())
        human = [names.get(s, s) for s in synsets]
    return ImagePathsDataset([str(root / "data" / r) for r in rels], size=size, labels=[index[s] for s in synsets],
                             human_labels=human or synsets, interpolation=interpolation, flip_p=flip_p)


# --- upstream config targets --------------------------------------------------------------------------------------

def _imagenet_cfg(split: str) -> Callable[..., Any]:
    def make(*, config: Mapping[str, Any] | None = None, data_root: str | None = None, size: int | None = None,
             **kw: Any) -> Any:
        config = dict(config or {})
        sz = size or config.get("size", 256)
        return imagenet(split, size=sz, data_root=data_root, **kw)

    return make


def _imagenet_sr_cfg(split: str) -> Callable[..., Any]:
    # The autoencoder configs train on ImageNetSR; an autoencoder reads only its ``image`` (the HR crop).
    def make(*, size: int, degradation: str | None = None, downscale_f: int = 4, min_crop_f: float = 0.5,
             max_crop_f: float = 1.0, random_crop: bool = True, data_root: str | None = None, **kw: Any) -> Any:
        return imagenet(split, size=size, data_root=data_root, **kw)

    return make


def _lsun_cfg(subset: str, split: str) -> Callable[..., Any]:
    return lambda **kw: lsun(subset, split, **kw)


def _faces_cfg(name: str, split: str) -> Callable[..., Any]:
    def make(*, size: int, keys: Any = None, **kw: Any) -> Any:
        return faces(name, split, size=size, **kw)

    return make


def _folder_cfg(*, root: str, size: int, **kw: Any) -> Any:
    return ImageFolder(root, size, **kw)


DATASETS: dict[str, Callable[..., Any]] = {
    "folder": _folder_cfg,
    "ldmcli.training.data.ImageFolder": _folder_cfg,
    "ldm.data.imagenet.ImageNetTrain": _imagenet_cfg("train"),
    "ldm.data.imagenet.ImageNetValidation": _imagenet_cfg("validation"),
    "ldm.data.imagenet.ImageNetSRTrain": _imagenet_sr_cfg("train"),
    "ldm.data.imagenet.ImageNetSRValidation": _imagenet_sr_cfg("validation"),
    "taming.data.faceshq.CelebAHQTrain": _faces_cfg("celebahq", "train"),
    "taming.data.faceshq.CelebAHQValidation": _faces_cfg("celebahq", "validation"),
    "taming.data.faceshq.FFHQTrain": _faces_cfg("ffhq", "train"),
    "taming.data.faceshq.FFHQValidation": _faces_cfg("ffhq", "validation"),
}
for _subset, _cls in (("churches", "Churches"), ("bedrooms", "Bedrooms"), ("cats", "Cats")):
    DATASETS[f"ldm.data.lsun.LSUN{_cls}Train"] = _lsun_cfg(_subset, "train")
    DATASETS[f"ldm.data.lsun.LSUN{_cls}Validation"] = _lsun_cfg(_subset, "validation")


def build_dataset(target: str, params: Mapping[str, Any], callback: Progress | None = None) -> Any:
    """Instantiate a dataset named by an upstream config ``target`` (or ``folder``) with its ``params``."""
    if target not in DATASETS:
        raise UsageError(f"unknown dataset target {target!r}; known: {', '.join(sorted(DATASETS))}")
    params = dict(params)
    if "interpolation" in params and params["interpolation"] not in INTERPOLATIONS:
        raise UsageError(f"data interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                         f"not {params['interpolation']!r}")
    if target.startswith("ldm.data.imagenet.ImageNet") and callback is not None:
        params["callback"] = callback
    try:
        ds = DATASETS[target](**params)
    except TypeError as e:
        raise UsageError(f"dataset {target}: {e}") from e
    if len(ds) == 0:
        raise DataError(f"dataset {target} is empty")
    return ds


# --- held-out validation examples ---------------------------------------------------------------------------------

class Subset:
    """Some examples of a dataset (``indices``), with its labels, captions and scan report narrowed to them."""

    def __init__(self, base: Any, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = list(indices)
        self.report = getattr(base, "report", None)
        for name in ("labels", "human_labels", "captions", "paths"):
            values = getattr(base, name, None)
            setattr(self, name, [values[i] for i in self.indices] if values is not None else None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i, item_seed = _split_key(key)
        return self.base[(self.indices[i], item_seed) if item_seed is not None else self.indices[i]]


def hold_out(dataset: Any, fraction: float) -> tuple[Subset, Subset]:
    """Split ``dataset`` into (training, validation) with ``round(fraction * n)`` (at least 1) validation examples.

    The split depends only on the files: examples are ordered by a hash of their path relative to the data folder
    (their index where the dataset has no paths), so the same folder gives the same split on every run, on resume,
    and wherever the folder is moved; adding images moves few of the old ones across."""
    import hashlib

    n = len(dataset)
    k = max(1, round(fraction * n))
    if k >= n:
        raise DataError(f"cannot hold out {fraction:g} of {n} example(s) for validation and still train on some")
    paths = getattr(dataset, "paths", None)
    root = getattr(dataset, "root", None)

    def key(i: int) -> bytes:
        if paths is None:
            name = str(i)
        else:
            p = Path(paths[i])
            name = p.relative_to(root).as_posix() if root is not None and p.is_relative_to(root) else p.name
        return hashlib.sha256(name.encode("utf-8")).digest()

    order = sorted(range(n), key=key)
    val = sorted(order[:k])
    held = set(val)
    return Subset(dataset, [i for i in range(n) if i not in held]), Subset(dataset, val)


# --- sampling order -----------------------------------------------------------------------------------------------

class ResumableSampler:
    """Seeded shuffling, sharded over ranks like ``DistributedSampler``, that can start mid-epoch.

    Yields ``(index, item_seed)``: the dataset draws its random flip from ``item_seed``, so examples and their
    augmentation depend only on (seed, epoch, position). :meth:`resume_at` skips the examples a checkpointed run
    had already consumed in its epoch."""

    def __init__(self, num_examples: int, *, seed: int, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        if num_examples <= 0:
            raise DataError("the dataset is empty")
        self.n = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._skip = 0
        self.per_rank = -(-num_examples // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, consumed: int) -> None:
        """Start the next iteration in ``epoch`` after ``consumed`` examples of this rank's shard."""
        self.epoch = epoch
        self._skip = consumed

    def order(self, epoch: int) -> list[int]:
        """This rank's example indices for ``epoch``."""
        if self.shuffle:
            import torch

            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        total = self.per_rank * self.world_size
        idx = (idx * (-(-total // self.n)))[:total]  # pad by repeating, as DistributedSampler does
        return idx[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self.epoch, self._skip
        self._skip = 0
        base = (self.seed * 1_000_003 + epoch) * 10_000_019
        for pos, i in enumerate(self.order(epoch)):
            if pos >= skip:
                yield i, (base + pos * self.world_size + self.rank) % (2**63)

    def __len__(self) -> int:
        return self.per_rank


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack arrays and numbers into tensors; keep strings as lists (captions, paths, human labels)."""
    import torch

    out: dict[str, Any] = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if isinstance(values[0], np.ndarray):
            out[key] = torch.from_numpy(np.stack(values))
        elif isinstance(values[0], (int, np.integer)):
            out[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(values[0], (float, np.floating)):
            out[key] = torch.tensor(values, dtype=torch.float32)
        else:
            out[key] = list(values)
    return out
