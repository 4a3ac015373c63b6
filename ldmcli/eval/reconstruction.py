"""``ldm eval ae``: how well a first stage reconstructs real images, as upstream's first-stage table reports it:
rFID (FID of the reconstructions against the inputs), PSNR, SSIM and LPIPS, mean and standard deviation over the
images.

Each image is resized (shorter side, bicubic) and centre-cropped to the model's resolution, encoded and decoded in
float32 (a KL model decodes its posterior's mode, a VQ model its quantised code), and turned back into uint8 as the
sampling commands do. PSNR and SSIM compare the two uint8 images (SSIM: Gaussian window 11, sigma 1.5, kornia's,
averaged over the valid region and the channels); LPIPS is the VGG LPIPS the autoencoder losses train with
(:mod:`ldmcli.models.losses`, weights from the store's ``lpips`` asset) on both images in [-1, 1]; rFID uses
:mod:`ldmcli.eval.fidelity`. ``model`` may also be an LDM: its first stage is measured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from ldmcli.errors import UsageError
from ldmcli.eval import fidelity
from ldmcli.eval.images import open_images
from ldmcli.eval.metrics import EventFn, Inception, _emit, download_progress


@dataclass
class ReconstructionMetrics:
    """The numbers of ``ldm eval ae`` (``*_std``: standard deviation over the images, as upstream's +/-)."""

    model: str
    n_images: int
    resolution: int
    rfid: float | None = None
    psnr: float = 0.0
    psnr_std: float = 0.0
    ssim: float = 0.0
    ssim_std: float = 0.0
    lpips: float | None = None
    lpips_std: float | None = None
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return dict(self.__dict__)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """``[h, w, 3]`` uint8 → ``[size, size, 3]``: shorter side resized to ``size`` (bicubic), centre crop."""
    h, w = image.shape[:2]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        if (nh, nw) != (h, w):
            image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BICUBIC))
        top, left = (nh - size) // 2, (nw - size) // 2
        image = image[top:top + size, left:left + size]
    return np.ascontiguousarray(image)


def first_stage_of(model: Any) -> Any:
    """The autoencoder to measure: the model itself, or an LDM's ``first_stage_model``."""
    return getattr(model, "first_stage_model", None) or model


def model_resolution(cfg: Any) -> int:
    """The pixel size a model config works at: an LDM's latent size times f, else the first stage's ``resolution``."""
    if getattr(cfg, "ldm", None) is not None:
        return int(cfg.ldm.image_size) * int(cfg.downsampling_factor)
    return int(cfg.first_stage.ddconfig.resolution)


@torch.no_grad()
def reconstruct(ae: Any, images: np.ndarray) -> np.ndarray:
    """``[b, h, w, 3]`` uint8 through the autoencoder and back to uint8 (KL: posterior mode; VQ: quantised)."""
    from ldmcli.models.autoencoder import AutoencoderKL
    from ldmcli.output import to_uint8

    param = next(ae.parameters())
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(param.device) / 127.5 - 1.0
    x = x.to(param.dtype)  # a model trained in bf16-true / 16-true precision holds its weights in that type
    if isinstance(ae, AutoencoderKL):
        out = ae.decode(ae.encode(x).mode())
    else:
        out = ae(x)[0]
    return to_uint8(out)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of two ``[n, h, w, 3]`` uint8 batches (identical images: 100 dB, a finite cap)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        value = 10.0 * np.log10(255.0 ** 2 / mse)
    return np.minimum(value, 100.0)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image SSIM of two ``[n, h, w, 3]`` uint8 batches (kornia, window 11, sigma 1.5, valid region)."""
    from kornia.metrics import ssim as kornia_ssim

    if min(a.shape[1:3]) < 11:
        raise UsageError(f"SSIM needs images of at least 11x11 pixels, got {a.shape[1]}x{a.shape[2]}")
    x = torch.from_numpy(a).permute(0, 3, 1, 2).double()
    y = torch.from_numpy(b).permute(0, 3, 1, 2).double()
    return kornia_ssim(x, y, 11, max_val=255.0, padding="valid").mean(dim=(1, 2, 3)).numpy()


def load_lpips(device: torch.device, on_event: EventFn | None = None) -> torch.nn.Module:
    """The training LPIPS with the store's ``lpips`` weights, frozen, in eval mode."""
    from ldmcli import store
    from ldmcli.models.losses import load_lpips as build

    folder = store.asset_path("lpips", progress=download_progress(on_event))
    return build(folder / "vgg16-397923af.pth", folder / "vgg.pth", device=device)


@torch.no_grad()
def lpips_distance(net: torch.nn.Module, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    device = next(net.parameters()).device
    x = torch.from_numpy(a).permute(0, 3, 1, 2).float().to(device) / 127.5 - 1.0
    y = torch.from_numpy(b).permute(0, 3, 1, 2).float().to(device) / 127.5 - 1.0
    return net(x, y).reshape(len(a)).double().cpu().numpy()


def _batched(images: Iterator[np.ndarray], size: int, batch_size: int, limit: int) -> Iterator[np.ndarray]:
    pending: list[np.ndarray] = []
    for k, image in enumerate(images):
        if k >= limit:
            break
        pending.append(center_crop(image, size))
        if len(pending) == batch_size:
            yield np.stack(pending)
            pending = []
    if pending:
        yield np.stack(pending)


def evaluate_autoencoder(model: str | Path, data: str | Path, *, batch_size: int = 8,
                         device: torch.device | str = "cpu", limit: int | None = None, rfid: bool = True,
                         lpips: bool = True, on_event: EventFn | None = None) -> ReconstructionMetrics:
    """rFID, PSNR, SSIM and LPIPS of ``model`` (zoo name, ``train-ae``/``train-ldm`` run folder or checkpoint) on
    the images at ``data`` (a folder or an ``.npz``), at most ``limit`` of them."""
    from ldmcli.loading import load, resolve

    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UsageError(f"the image limit must be at least 1, got {limit}")
    started = time.perf_counter()
    images = open_images(data, "data")
    source = resolve(str(model))
    if rfid:
        fidelity.library()  # a missing torch-fidelity is an error before any loading
    device = torch.device(device)
    _emit(on_event, "stage", "model", message=f"loading {source.name}")
    loaded = load(source, device=device, progress=download_progress(on_event))
    ae = first_stage_of(loaded.model)
    size = model_resolution(loaded.config)
    lpips_net = load_lpips(device, on_event) if lpips else None
    inception = Inception(device, on_event) if rfid else None
    total = min(len(images), limit or len(images))
    result = ReconstructionMetrics(source.name, total, size)
    psnrs, ssims, dists, real_feats, rec_feats = [], [], [], [], []
    _emit(on_event, "stage", "reconstruct", 0, total, message=f"reconstructing {total} images at {size}x{size}")
    done = 0
    for batch in _batched(images.images(), size, batch_size, total):
        rec = reconstruct(ae, batch)
        psnrs.append(psnr(batch, rec))
        ssims.append(ssim(batch, rec))
        if lpips_net is not None:
            dists.append(lpips_distance(lpips_net, batch, rec))
        if inception is not None:
            real_feats.append(inception.extract_batches([batch], None, "inception")[0])
            rec_feats.append(inception.extract_batches([rec], None, "inception")[0])
        done += len(batch)
        _emit(on_event, "progress", "reconstruct", done, total)
    p, s = np.concatenate(psnrs), np.concatenate(ssims)
    result.psnr, result.psnr_std = float(p.mean()), float(p.std())
    result.ssim, result.ssim_std = float(s.mean()), float(s.std())
    if dists:
        d = np.concatenate(dists)
        result.lpips, result.lpips_std = float(d.mean()), float(d.std())
    if inception is not None:
        if total < 2:
            result.skipped["rfid"] = "needs at least 2 images"
        else:
            real = fidelity.fid_statistics(torch.cat(real_feats))
            result.rfid = fidelity.fid(fidelity.fid_statistics(torch.cat(rec_feats)), real)
    result.seconds = time.perf_counter() - started
    return result
