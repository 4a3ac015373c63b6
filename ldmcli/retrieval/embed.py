"""Build your own retrieval database: CLIP image embeddings of a folder of images, in upstream's ``.npz`` format.

Images are listed recursively in sorted order and embedded in shards of ``shard_size`` images
(``shard-00000.npz``, ...), each written atomically. A rerun skips every shard already complete for the same images,
so an interrupted embedding resumes where it stopped. ``img_id`` is the image's path relative to the folder,
``patch_coords`` the whole image ``(0, 0, width, height)`` (one patch per image).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ldmcli import paths
from ldmcli.errors import UsageError
from ldmcli.retrieval.database import Progress, _read_members, write_shard

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SHARD_PATTERN = "shard-{:05d}.npz"


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, hidden files skipped), sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--from-images: {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise UsageError(f"--from-images: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return files


def _shard_is_complete(path: Path, ids: list[str], dim: int) -> bool:
    """True when ``path`` is a readable shard holding exactly these images at this dimension."""
    if not path.is_file():
        return False
    try:
        members = _read_members(path)
        if members["embedding"].shape != (len(ids), dim):
            return False
        with np.load(path, allow_pickle=False) as z:
            return z["img_id"].tolist() == ids
    except Exception:  # any unreadable or foreign file is simply recomputed
        return False


def embed_image_folder(images: str | os.PathLike, name: str, clip, *, batch_size: int = 16, shard_size: int = 1024,
                       out_dir: Path | None = None, callback: Progress | None = None) -> Path:
    """Embed every image under ``images`` with ``clip`` (a :class:`ldmcli.models.clip.ClipEncoder`) into shards under
    ``data/rdm/retrieval_databases/<name>/`` (or ``out_dir``); returns the folder. ``callback("embed", done, total)``
    counts images, skipped (already complete) shards included."""
    from ldmcli.models.clip import load_image

    if batch_size < 1 or shard_size < 1:
        raise UsageError("--batch-size and --shard-size must be at least 1")
    root = Path(images)
    files = list_images(root)
    out = Path(out_dir) if out_dir is not None else paths.databases_dir() / name
    out.mkdir(parents=True, exist_ok=True)
    n_shards = (len(files) + shard_size - 1) // shard_size
    expected = {SHARD_PATTERN.format(i) for i in range(n_shards)}
    for stale in out.glob("shard-*.npz"):  # shards of an earlier, larger image set
        if stale.name not in expected:
            stale.unlink()
    total = len(files)
    done = 0
    if callback is not None:
        callback("embed", 0, total)
    for i in range(n_shards):
        chunk = files[i * shard_size: (i + 1) * shard_size]
        ids = [p.relative_to(root).as_posix() for p in chunk]
        path = out / SHARD_PATTERN.format(i)
        if not _shard_is_complete(path, ids, clip.dim):
            embeddings = []
            coords = []
            for start in range(0, len(chunk), batch_size):
                batch = [load_image(p) for p in chunk[start: start + batch_size]]
                coords.extend((0, 0, img.shape[2], img.shape[1]) for img in batch)
                embeddings.append(clip.encode_image_list(batch, batch_size=batch_size).cpu().numpy())
                if callback is not None:
                    callback("embed", done + start + len(batch), total)
            write_shard(path, np.concatenate(embeddings).astype(np.float32), np.array(ids),
                        np.array(coords, dtype=np.int64))
        done += len(chunk)
        if callback is not None:
            callback("embed", done, total)
    return out
