"""scikit-learn's handwritten digits (the UCI "Optical Recognition of Handwritten Digits" test set: 1,797 images of
8x8 pixels, 17 grey levels, 10 classes) as an image folder for ``ldm train-ae`` / ``ldm train-ldm``.

Each 8x8 image is scaled to 0-255 (white digit on black, as scikit-learn stores it), upscaled to 32x32 with
bicubic interpolation and written as a greyscale PNG to ``OUT/<class>/<index>.png``; the class sub-folders give the
labels of class-conditional training. :func:`to_digits_8x8` is the way back (box average to 8x8, 0-16 scale) that
the quality check uses to classify generated images with a classifier trained on the real 8x8 digits.

Run ``python -m ldmcli.datasets.digits data/digits`` (needs scikit-learn).

The quality check of the built-in ``digits`` model lives here too (``benchmarks/digits_quality.py`` prints it, the
tests run a smaller one): an SVC fitted on the real 8x8 digits labels class-conditional samples
(:func:`conditional_accuracy`), the classes of null-class samples show the unconditional model covers every digit
(:func:`class_histogram`), and :func:`sampler_errors` compares few-step samplers with a 1000-step DDIM solution
from the same x_T.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from einops import rearrange, reduce
from PIL import Image

from ldmcli.errors import LdmError, UsageError
from ldmcli.fileio import atomic_path

SIZE = 32
NATIVE = 8
MAX_VALUE = 16.0  # scikit-learn's digits take the values 0..16


def load_digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 real digits as ``[n, 8, 8]`` float64 in 0..16 and their labels ``[n]`` (scikit-learn's copy)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise LdmError("the digits dataset comes from scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    return bunch.images.astype(np.float64), bunch.target.astype(np.int64)


def upscale(images_8x8: np.ndarray, size: int = SIZE) -> np.ndarray:
    """``[n, 8, 8]`` digits in 0..16 → ``[n, size, size]`` uint8 (bicubic, PIL)."""
    out = np.empty((len(images_8x8), size, size), dtype=np.uint8)
    for k, img in enumerate(images_8x8):
        grey = np.clip(np.round(img * (255.0 / MAX_VALUE)), 0, 255).astype(np.uint8)
        out[k] = np.asarray(Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.BICUBIC))
    return out


def to_digits_8x8(images: np.ndarray) -> np.ndarray:
    """Generated images back to the classifier's input: ``[n, h, w]`` or ``[n, h, w, c]`` uint8 (RGB averaged to
    grey) → ``[n, 8, 8]`` float64 in 0..16, by averaging each (h/8)x(w/8) block."""
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 4:
        x = reduce(x, "n h w c -> n h w", "mean")
    if x.ndim != 3 or x.shape[1] % NATIVE or x.shape[2] % NATIVE:
        raise ValueError(f"expected [n, h, w(, c)] images with sides divisible by 8, got shape {x.shape}")
    x = reduce(x, "n (h a) (w b) -> n h w", "mean", h=NATIVE, w=NATIVE)
    return x * (MAX_VALUE / 255.0)


def flatten(images_8x8: np.ndarray) -> np.ndarray:
    """``[n, 8, 8]`` → ``[n, 64]``, the feature vectors scikit-learn's classifiers take."""
    return rearrange(np.asarray(images_8x8), "n h w -> n (h w)")


def export_digits(out: str | os.PathLike, *, size: int = SIZE,
                  callback: Callable[[int, int], None] | None = None) -> int:
    """Write every digit as ``out/<label>/<index:04d>.png`` (``size``x``size`` greyscale); returns the count.

    Files are written under a temporary name and renamed, so an interrupted export leaves only complete images; an
    existing complete export is rewritten identically. ``callback(done, total)`` reports progress."""
    if size < NATIVE:
        raise UsageError(f"size must be at least {NATIVE}, got {size}")
    root = Path(out).expanduser()
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} exists and is not a folder")
    images, labels = load_digits_8x8()
    big = upscale(images, size)
    for label in np.unique(labels):
        (root / str(int(label))).mkdir(parents=True, exist_ok=True)
    total = len(big)
    for k, (img, label) in enumerate(zip(big, labels)):
        with atomic_path(root / str(int(label)) / f"{k:04d}.png", fsync=False) as tmp:
            Image.fromarray(img, mode="L").save(tmp, format="PNG")
        if callback is not None:
            callback(k + 1, total)
    return total


# ------------------------------------------------------------------------------------------------ quality check


def fit_classifier() -> Any:
    """scikit-learn's SVC (RBF kernel, gamma 0.001, as its digits example) fitted on all 1,797 real 8x8 digits."""
    from sklearn.svm import SVC

    images, labels = load_digits_8x8()
    return SVC(gamma=0.001).fit(flatten(images), labels)


def classify(classifier: Any, images: np.ndarray) -> np.ndarray:
    """Labels for generated ``[n, h, w, 3]`` uint8 images (downsampled to 8x8 by :func:`to_digits_8x8`)."""
    return np.asarray(classifier.predict(flatten(to_digits_8x8(images))), dtype=np.int64)


def sample_images(
    loaded: Any,
    labels: Sequence[int],
    *,
    seed: int = 0,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    scale: float = 1.0,
    batch_size: int = 100,
    device: Any = "cpu",
    callback: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Sample a class-conditional LDM, image ``i`` of class ``labels[i]`` from seed ``seed + i`` (as ``ldm sample``
    seeds its images), with classifier-free guidance ``scale`` against the model's null class; ``[n, H, W, 3]``
    uint8. ``callback(done, total)`` after every batch."""
    import torch

    from ldmcli.fastpath import decode_latents, inference_context
    from ldmcli.pipelines.generation import class_range
    from ldmcli.sampling import SamplerSettings, sample_latents
    from ldmcli.output import to_uint8
    from ldmcli.sampling import DiscreteSchedule

    model, cfg = loaded.model, loaded.config
    settings = SamplerSettings(sampler, steps, eta, scale)
    settings.validate(model.num_timesteps)
    _, null = class_range(cfg)
    if scale != 1.0 and null is None:
        raise UsageError("guidance needs a null class")
    shape = (cfg.ldm.channels, cfg.ldm.image_size, cfg.ldm.image_size)
    key = getattr(model, "cond_stage_key", "class_label")
    schedule = DiscreteSchedule.from_model(model)
    device = torch.device(device)
    out = []
    with inference_context():
        for start in range(0, len(labels), batch_size):
            batch = [int(c) for c in labels[start:start + batch_size]]
            gens = [torch.Generator("cpu").manual_seed(seed + start + k) for k in range(len(batch))]
            x_T = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
            cond = model.get_learned_conditioning({key: torch.tensor(batch, device=device)})
            uncond = None
            if scale != 1.0:
                uncond = model.get_learned_conditioning({key: torch.full((len(batch),), null, device=device)})
            z = sample_latents(model, x_T, cond, uncond, settings, schedule=schedule, generator=gens)
            out.append(to_uint8(decode_latents(model, z)))
            if callback is not None:
                callback(min(start + batch_size, len(labels)), len(labels))
    return np.concatenate(out)


def conditional_accuracy(loaded: Any, classifier: Any, per_class: int, **sampling: Any) -> tuple[float, np.ndarray]:
    """Sample ``per_class`` images of each real class; the fraction the classifier labels with the asked class, and
    the per-class fractions (``sampling``: :func:`sample_images` options)."""
    from ldmcli.pipelines.generation import class_range

    n_real, _ = class_range(loaded.config)
    asked = np.repeat(np.arange(n_real), per_class)
    got = classify(classifier, sample_images(loaded, asked.tolist(), **sampling))
    per = np.array([(got[asked == c] == c).mean() for c in range(n_real)])
    return float((got == asked).mean()), per


def class_histogram(loaded: Any, classifier: Any, n: int, **sampling: Any) -> np.ndarray:
    """Classify ``n`` samples of the null class (the unconditional model ``--cond-drop`` trained): counts per class."""
    from ldmcli.pipelines.generation import class_range

    n_real, null = class_range(loaded.config)
    if null is None:
        raise UsageError("this model has no null class: it cannot sample unconditionally")
    got = classify(classifier, sample_images(loaded, [null] * n, **{**sampling, "scale": 1.0}))
    return np.bincount(got, minlength=n_real)


def sampler_errors(loaded: Any, n: int = 16, *, seed: int = 0, dpmpp_steps: int = 20, ddim_steps: int = 50,
                   callback: Callable[[str], None] | None = None) -> dict[str, float]:
    """How closely DPM-Solver++(2M) with ``dpmpp_steps`` and DDIM (eta 0) with ``ddim_steps`` follow the DDIM
    solution through every timestep ("1000-step DDIM"), from one fixed ``x_T`` (``n`` images of classes 0, 1, ...,
    no guidance). Relative RMS distances in latent space:

    * ``dpmpp``, ``ddim``: issue 4's measure (:func:`ldmcli.sampling.accuracy.solver_errors`: every solver spans
      the same ODE, timestep N-1 to 0, DDIM on an evenly spaced grid);
    * ``ddim-upstream`` and, after decoding, ``*/pixels``: DDIM on upstream's grid (what ``ldm sample`` runs; it starts
      at timestep 1 + (N // S) * (S - 1), not N-1) against the same reference, and each result's decoded image.
    """
    import torch

    from ldmcli.fastpath import decode_latents, inference_context
    from ldmcli.pipelines.generation import class_range
    from ldmcli.sampling import (DiscreteSchedule, ddim_timesteps, dpmpp_timesteps, model_denoiser, sample_ddim,
                                 sample_dpmpp_2m)
    from ldmcli.sampling.accuracy import solver_errors

    model, cfg = loaded.model, loaded.config
    n_real, _ = class_range(cfg)
    shape = (cfg.ldm.channels, cfg.ldm.image_size, cfg.ldm.image_size)
    key = getattr(model, "cond_stage_key", "class_label")
    schedule = DiscreteSchedule.from_model(model)
    x_T = torch.randn((n, *shape), generator=torch.Generator("cpu").manual_seed(seed))
    steps = schedule.num_timesteps
    with inference_context():
        cond = model.get_learned_conditioning({key: torch.arange(n) % n_real})
        eps = model_denoiser(model, cond, None, 1.0, schedule=schedule)
        if callback is not None:
            callback("issue 4's measure")
        measure = solver_errors(eps, x_T, schedule, dpmpp_steps=dpmpp_steps, ddim_steps=ddim_steps)
        out = {"dpmpp": measure["dpmpp"] / measure["reference_rms"], "ddim": measure["ddim"] / measure["reference_rms"]}
        if callback is not None:
            callback("upstream grid and pixels")
        runs = {
            "reference": sample_ddim(eps, x_T, schedule, np.arange(1, steps)),
            "dpmpp": sample_dpmpp_2m(eps, x_T, schedule, dpmpp_timesteps(schedule, dpmpp_steps)),
            "ddim-upstream": sample_ddim(eps, x_T, schedule, ddim_timesteps(ddim_steps, steps)),
        }
        pixels = {name: decode_latents(model, z).double() for name, z in runs.items()}
    ref, ref_px = runs["reference"].double(), pixels["reference"]
    out["ddim-upstream"] = float((runs["ddim-upstream"].double() - ref).norm() / ref.norm())
    for name in ("dpmpp", "ddim-upstream"):
        out[f"{name}/pixels"] = float((pixels[name] - ref_px).norm() / ref_px.norm())
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m ldmcli.datasets.digits OUT [SIZE]``: export the digits image folder."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2 or args[0] in ("-h", "--help"):
        sys.stderr.write("usage: python -m ldmcli.datasets.digits OUT_FOLDER [SIZE (default 32)]\n")
        return 2
    try:
        n = export_digits(args[0], size=int(args[1]) if len(args) == 2 else SIZE)
    except (LdmError, ValueError) as e:
        sys.stderr.write(f"error: {e}\n")
        return getattr(e, "exit_code", 2)
    sys.stderr.write(f"wrote {n} images to {args[0]}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
