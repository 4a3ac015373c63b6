"""LDSR (bsr_sr) patch-wise at full size on CPU: seconds per sampler step, decode time and peak RSS.

A random-weight model of the bsr_sr architecture (168.9M parameters, from ldmcli/presets/bsr_sr.yaml) runs upstream's
notebook settings (``split_input_params``: ks 128, stride 64, vqf 4) on a ``--size`` x ``--size`` low-resolution
input: one ``apply_model`` call (what every DDIM step costs; the sampler's own arithmetic is negligible) and the
patch-wise decode of the ``4 * size`` output. Peak RSS is the whole process (model included).

    python benchmarks/ldsr_patchwise.py                         # 1024 -> 4096 (minutes per step on 2 cores)
    python benchmarks/ldsr_patchwise.py --size 256 --patch-batch 1,4
"""

from __future__ import annotations

import argparse
import time

import torch

from _bench import REPO, current_rss_gb, fill_zero_layers, params, peak_rss_gb


def build_bsr_sr() -> torch.nn.Module:
    from ldmcli import config

    cfg = config.load_config(REPO / "ldmcli" / "presets" / "bsr_sr.yaml")
    model = config.build_model(cfg)
    fill_zero_layers(model)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="low-resolution side (the output is 4x)")
    ap.add_argument("--patch-batch", default="4", help="comma-separated patch batch sizes to compare")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from ldmcli.devices import cpu_flags
    from ldmcli.models.patches import NOTEBOOK_SPLIT, patch_starts

    flags = cpu_flags()
    caps = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX512-BF16", "avx512_bf16"),
                                    ("AMX", "amx_bf16")) if flag in flags]
    print(f"CPU: {', '.join(caps) or 'no AVX2'}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    model = build_bsr_sr()
    print(f"bsr_sr random weights: {params(model.model) / 1e6:.1f}M UNet params, RSS {current_rss_gb():.2f} GB")
    s = args.size
    n = len(patch_starts(s, min(128, s), 64)) ** 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, s, s, generator=g)
    c = torch.rand(1, 3, s, s, generator=g) * 2 - 1
    t = torch.tensor([500])
    for batch in (int(b) for b in args.patch_batch.split(",")):
        last = [time.perf_counter()]

        def progress(stage: str, done: int, total: int) -> None:
            if done == total or done % max(1, total // 5) < batch:
                print(f"    {stage} {done}/{total} patches, {time.perf_counter() - last[0]:.1f}s, "
                      f"RSS {current_rss_gb():.2f} GB", flush=True)

        model.split_input_params = {**NOTEBOOK_SPLIT, "patch_batch": batch, "progress": progress}
        with torch.no_grad():
            last[0] = t0 = time.perf_counter()
            eps = model.apply_model(x, t, c)
            step = time.perf_counter() - t0
            print(f"patch_batch {batch}: one step on a {s}x{s} latent ({n} UNet patches) {step:.1f}s "
                  f"({step / n:.2f}s a patch), peak RSS so far {peak_rss_gb():.2f} GB", flush=True)
            assert torch.isfinite(eps).all()
            if not args.no_decode:
                last[0] = t0 = time.perf_counter()
                img = model.decode_first_stage(x)
                dec = time.perf_counter() - t0
                print(f"patch_batch {batch}: decode to {tuple(img.shape[-2:])} {dec:.1f}s, "
                      f"peak RSS so far {peak_rss_gb():.2f} GB", flush=True)
                del img
    print(f"peak RSS {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
