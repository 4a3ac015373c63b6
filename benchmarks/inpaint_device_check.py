"""Device check for ``ldm inpaint`` (not a test): CPU vs CUDA agreement of the inpainting pipeline, unmasked pixels
kept on the device, and seconds per image of inpainting_big's architecture (random weights) at 50 DDIM steps.

Run from the repository root: ``python benchmarks/inpaint_device_check.py`` (needs CUDA; ``--quick`` for fewer sizes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldmcli import config  # noqa: E402
from ldmcli import inpaint as ip  # noqa: E402
from ldmcli.examples import example_pairs  # noqa: E402
from ldmcli.loading import load_model  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def tiny_parity(device: torch.device) -> None:
    from tests.tinymodels import write_tiny

    with tempfile.TemporaryDirectory() as tmp:
        files = write_tiny("inpaint", tmp)
        cpu = load_model(str(files.config), ckpt=files.ckpt)
        dev = load_model(str(files.config), ckpt=files.ckpt, device=device)
    pair = example_pairs(max_side=64)[1]
    factor = ip.model_factor(cpu)
    image, mask = ip.pad_to_multiple(pair.image, factor), ip.pad_to_multiple(pair.mask, factor)
    h, w = image.shape[:2]
    x_T = torch.randn((1, 3, h // 4, w // 4), generator=torch.Generator().manual_seed(0))
    a = ip.inpaint_batch(cpu, ip.make_batch(image, mask), steps=20, x_T=x_T)
    b = ip.inpaint_batch(dev, ip.make_batch(image, mask, device), steps=20, x_T=x_T)
    print(f"tiny model, 20 DDIM steps, fp32: CPU vs {device.type} relative L2 {rel(b, a):.2e}")
    out = ip.inpaint_array(dev, pair.image, pair.mask, steps=5, generator=torch.Generator().manual_seed(0))
    keep = pair.mask < 128
    print(f"tiny model on {device.type}: unmasked pixels identical: {bool((out[keep] == pair.image[keep]).all())}")


def big_timing(device: torch.device, sizes: list[int]) -> None:
    torch.manual_seed(0)
    model = config.build_model(config.load_config("inpainting_big")).eval().requires_grad_(False).to(device)
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype) if dtype == torch.float32 else _cast_networks(model, dtype)
        for side in sizes:
            pair = example_pairs(max_side=None)[0]
            image = np.asarray(np.resize(pair.image, (side, side, 3)), dtype=np.uint8)
            mask = np.zeros((side, side), np.uint8)
            mask[side // 4 : side // 2, side // 4 : side // 2] = 255
            ip.inpaint_array(model, image, mask, steps=2)  # warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = ip.inpaint_array(model, image, mask, steps=50, generator=torch.Generator().manual_seed(0))
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            keep = mask < 128
            same = bool((out[keep] == image[keep]).all())
            print(f"inpainting_big arch {side}x{side} {str(dtype)[6:]}: {seconds:.2f} s/image (50 DDIM steps), "
                  f"unmasked identical {same}, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def _cast_networks(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    for child in model.children():  # as load_model does: networks in dtype, the schedule buffers stay float32
        child.to(dtype)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(device), torch.__version__)
    tiny_parity(device)
    big_timing(device, [256] if args.quick else [256, 512])


if __name__ == "__main__":
    main()
