"""One UNet step of txt2img-f8-large (Rombach et al. 2022) at 256x256 with guidance (batch 2): ldm vs diffusers.

Not a test. Measures, in one process, alternating the contenders round by round (median of ``--repeats``):

* ldm's ``UNetModel`` (the fast path: channels_last and convolution weights packed once on CPUs, SDPA,
  inference_mode; ``--other-layout`` adds the other memory format, ``--no-pack`` drops the packing) against
  diffusers' ``UNet2DConditionModel`` of the same architecture holding the same weights (converted with
  ``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint``; 872,300,484 parameters asserted on both);
* in float32, and in bf16 (ldm with bf16 weights; diffusers with bf16 autocast over float32 weights, and with bf16
  weights); fp16 too where asked (GPUs);
* achieved GFLOP/s (``torch.utils.flop_counter``) as a fraction of the measured matmul peak of the same dtype;
* the drift of bf16/fp16 against float32 (relative L2 of the predicted noise), and ldm vs diffusers in float32;
* optionally (``--compile``) ldm compiled with frozen weights, with the compile time.

Random weights (speed does not depend on them). Run from the repository root::

    python benchmarks/unet_step.py                 # CPU, fp32 and bf16 (minutes; ~12 GB RAM)
    python benchmarks/unet_step.py --quick         # a scaled-down architecture, seconds: a smoke run
    python benchmarks/unet_step.py --device cuda --dtypes fp16,bf16 --compile

Needs the ``bench`` extra (``pip install ldmcli[bench]``: diffusers).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import _bench  # noqa: F401  (puts the repository on sys.path)
from _bench import DTYPES, alternate, collect, device_label, fill_zero_layers, matmul_peak, params, peak_rss_gb, rel_l2

from ldmcli import config as ldm_config
from ldmcli import fastpath
from ldmcli.devices import pick_device

EXPECTED_PARAMS = 872_300_484


def diffusers_config(unet_cfg: dict) -> dict:
    """The ``UNet2DConditionModel`` arguments equivalent to an ldm UNet config (txt2img-f8-large's layout)."""
    mc = unet_cfg["model_channels"]
    mult = unet_cfg["channel_mult"]
    n = len(mult)
    return dict(
        sample_size=unet_cfg["image_size"],
        in_channels=unet_cfg["in_channels"],
        out_channels=unet_cfg["out_channels"],
        layers_per_block=unet_cfg["num_res_blocks"],
        block_out_channels=tuple(mc * m for m in mult),
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=unet_cfg["context_dim"],
        attention_head_dim=unet_cfg["num_heads"],  # diffusers' legacy name: the number of heads
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def unet_config(quick: bool) -> dict:
    cfg = ldm_config.load_config("txt2img-f8-large").ldm.unet
    u = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
    u["use_checkpoint"] = False
    if quick:  # the same layout, 5x narrower
        u.update(model_channels=64, context_dim=64)
    return u


def build_pair(u: dict, device: torch.device):
    """ldm's UNet (seeded random weights) and diffusers' with the same tensors assigned (no second copy)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    torch.manual_seed(0)
    with torch.device(device):  # built (and randomly initialised) where it runs
        ours = ldm_config.build_unet(ldm_config.load_config("txt2img-f8-large").ldm.unet.__class__(**u))
        fill_zero_layers(ours)
    ours.eval().requires_grad_(False)
    dcfg = diffusers_config(u)
    sd = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(sd, dcfg)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**dcfg)
    theirs.load_state_dict(converted, strict=True, assign=True)
    theirs.eval().requires_grad_(False)
    return ours, theirs


def count_flops(fn) -> int:
    """FLOPs of one call, CPU flash attention counted like the CUDA kernels (torch's counter misses it)."""
    aten = torch.ops.aten
    mapping = {}
    cpu_sdpa = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    ap.add_argument("--dtypes", default=None, help="comma-separated of fp32,bf16,fp16 (default: fp32,bf16 on CPU, "
                                                    "fp32,fp16,bf16 on CUDA)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    ap.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with guidance)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; 2 with --quick)")
    ap.add_argument("--compile", action="store_true", help="also time ldm compiled with frozen weights")
    ap.add_argument("--compile-dtypes", default=None, help="compile only for these dtypes (default: all)")
    ap.add_argument("--layout", choices=("auto", "channels_last", "contiguous"), default="auto",
                    help="ldm's memory format (auto: the fast path's, channels_last on CPUs, contiguous on GPUs)")
    ap.add_argument("--no-pack", action="store_true", help="ldm without packed convolution weights (CPU)")
    ap.add_argument("--other-layout", action="store_true", help="also time ldm in the other memory format")
    ap.add_argument("--quick", action="store_true", help="a 5x narrower architecture at 128x128: a smoke run")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads (default: torch's, one per core); on a shared machine, 1 avoids waiting "
                         "on a descheduled second thread at every operation")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtypes = args.dtypes.split(",") if args.dtypes else (["fp32", "fp16", "bf16"] if device.type == "cuda"
                                                         else ["fp32", "bf16"])
    size = 128 if args.quick and args.size == 256 else args.size
    repeats = args.repeats or (2 if args.quick else 5)
    log = print
    label = device_label(device)
    log(f"measuring on: {label}")
    results: dict = {"device": str(device), "device_kind": label, "torch": torch.__version__,
                     "threads": torch.get_num_threads(),
                     "size": size, "batch": args.batch, "repeats": repeats, "quick": args.quick}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    u = unet_config(args.quick)
    t0 = time.perf_counter()
    ours32, theirs32 = build_pair(u, device)
    n_ours, n_theirs = params(ours32), params(theirs32)
    log(f"built both UNets in {time.perf_counter() - t0:.1f}s: ldm {n_ours:,} params, diffusers {n_theirs:,}")
    assert n_ours == n_theirs, (n_ours, n_theirs)
    if not args.quick:
        assert n_ours == EXPECTED_PARAMS, n_ours
    results["params"] = n_ours

    g = torch.Generator().manual_seed(1)
    lat = size // 8
    x = torch.randn(args.batch, u["in_channels"], lat, lat, generator=g).to(device)
    t = torch.tensor([500, 500] * (args.batch // 2) + [500] * (args.batch % 2), device=device)
    ctx = torch.randn(args.batch, 77, u["context_dim"], generator=g).to(device)

    with torch.inference_mode():
        ref = ours32(x, t, context=ctx)
        d_ref = theirs32(x, t, encoder_hidden_states=ctx).sample
        results["ldm_vs_diffusers_fp32_rel_l2"] = rel_l2(ref, d_ref)
        log(f"ldm vs diffusers, float32 output: relative L2 {results['ldm_vs_diffusers_fp32_rel_l2']:.2e}")
        flops = count_flops(lambda: ours32(x, t, context=ctx))
    results["gflop_per_step"] = flops / 1e9
    log(f"one step: {flops / 1e9:.1f} GFLOP")

    runs: dict = {}
    for name in dtypes:
        dtype = DTYPES[name]
        collect()
        peak = matmul_peak(device, dtype)
        log(f"\n== {name}: measured matmul peak {peak:.0f} GFLOP/s [{label}]")
        xd, ctxd = x.to(dtype), ctx.to(dtype)
        pack = device.type == "cpu" and not args.no_pack
        cl = fastpath.default_channels_last(device) if args.layout == "auto" else args.layout == "channels_last"
        xcl = fastpath.to_memory_format(xd, cl)  # the fast path's layout: channels_last on CPUs, contiguous on GPUs
        other = "contiguous" if cl else "channels_last"
        fns = {}
        extra = []
        if dtype == torch.float32:
            ours = ours32.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            fns["ldm"] = lambda: ours(xcl, t, context=ctxd)
            fns["diffusers"] = lambda: theirs32(xd, t, encoder_hidden_states=ctxd).sample
        else:
            ours = _cast_copy(ours32, u, dtype, device, channels_last=cl)
            theirs = _cast_diffusers(theirs32, dtype)
            fns["ldm"] = lambda: ours(xcl, t, context=ctxd)
            if args.other_layout:
                ours_other = _cast_copy(ours32, u, dtype, device, channels_last=not cl)
                if device.type == "cpu" and not args.no_pack:
                    fastpath.pack_convolutions(ours_other)
                x_other = fastpath.to_memory_format(xd, not cl)
                fns[f"ldm_{other}"] = lambda: ours_other(x_other, t, context=ctxd)
                extra.append(ours_other)

            def autocast_fn():
                with torch.autocast(device.type, dtype=dtype):
                    return theirs32(x, t, encoder_hidden_states=ctx).sample

            fns["diffusers_autocast"] = autocast_fn
            fns["diffusers_weights"] = lambda: theirs(xd, t, encoder_hidden_states=ctxd).sample
            extra.append(theirs)
        if pack:
            fastpath.pack_convolutions(ours)  # the fast path on CPUs: convolution weights reordered once
        with torch.inference_mode():
            out = fns["ldm"]().float()
            drift = rel_l2(out, ref)
            times = alternate(fns, device, repeats, log=log)
            compiled = None
            if args.compile and (args.compile_dtypes is None or name in args.compile_dtypes.split(",")):
                try:
                    compiled = _time_compiled(ours, xcl, t, ctxd, device, repeats, log)
                except Exception as e:  # a compiler failure is a result to report, not a reason to lose the others
                    log(f"  compile failed: {type(e).__name__}: {str(e)[:300]}")
        entry = {"matmul_peak_gflops": peak, "eps_rel_l2_vs_fp32": drift, "seconds": times}
        for key, sec in times.items():
            entry.setdefault("fraction_of_peak", {})[key] = flops / sec / 1e9 / peak
        for key in times:
            if key != "ldm":
                entry.setdefault("ldm_over", {})[key] = times["ldm"] / times[key]
        if compiled is not None:
            entry["compiled"] = compiled
            entry["compiled"]["fraction_of_peak"] = flops / compiled["seconds"] / 1e9 / peak
        runs[name] = entry
        _report(name, entry, flops, label)
        if args.json:  # written after every dtype, so a run cut short keeps what it measured
            results["runs"] = runs
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2, default=str)
        if dtype == torch.float32:
            fastpath.unpack_convolutions(ours32)
            ours32.to(memory_format=torch.contiguous_format)
        del ours, fns, extra
    results["runs"] = runs
    results["peak_rss_gb"] = peak_rss_gb()
    log(f"\npeak RSS {results['peak_rss_gb']:.2f} GB")
    if device.type == "cuda":
        results["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        log(f"peak GPU memory {results['peak_gpu_gb']:.2f} GB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


def _cast_copy(ours32, u: dict, dtype: torch.dtype, device: torch.device, channels_last: bool = True):
    """A ``dtype`` copy of ldm's UNet (channels_last weights by default), built on meta and assigned."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.device("meta"):
        ours = ldm_config.build_unet(ldm_config.load_config("txt2img-f8-large").ldm.unet.__class__(**u))
    sd = {k: v.to(dtype=dtype, memory_format=fmt) if v.dim() == 4 else v.to(dtype)
          for k, v in ours32.state_dict().items()}
    ours.load_state_dict(sd, strict=True, assign=True)
    return ours.eval().requires_grad_(False).to(device)


def _cast_diffusers(theirs32, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        theirs = UNet2DConditionModel(**theirs32.config)
    theirs.load_state_dict({k: v.to(dtype) for k, v in theirs32.state_dict().items()}, strict=True, assign=True)
    return theirs.eval().requires_grad_(False)


def _time_compiled(ours, xcl, t, ctx, device, repeats, log) -> dict:
    fastpath.unpack_convolutions(ours)  # inductor's freezing packs the weights itself
    fastpath.compile_module(ours)
    t0 = time.perf_counter()
    ours(xcl, t, context=ctx)
    compile_s = time.perf_counter() - t0
    log(f"  compiled (frozen weights) in {compile_s:.1f}s, cache {fastpath.compile_cache_dir()}")
    times = alternate({"ldm_compiled": lambda: ours(xcl, t, context=ctx)}, device, repeats, log=log)
    return {"compile_seconds": compile_s, "seconds": times["ldm_compiled"]}


def _report(name: str, entry: dict, flops: int, label: str) -> None:
    print(f"-- {name} results (median seconds per step, GFLOP/s, fraction of the {name} matmul peak) [{label}]")
    for key, sec in entry["seconds"].items():
        print(f"   {key:20s} {sec:8.3f}s  {flops / sec / 1e9:7.0f} GFLOP/s  {entry['fraction_of_peak'][key]:6.1%}")
    if "compiled" in entry:
        c = entry["compiled"]
        print(f"   {'ldm_compiled':20s} {c['seconds']:8.3f}s  {flops / c['seconds'] / 1e9:7.0f} GFLOP/s  "
              f"{c['fraction_of_peak']:6.1%}  (compile {c['compile_seconds']:.0f}s)")
    for key, ratio in entry.get("ldm_over", {}).items():
        print(f"   ratio ldm / {key}: {ratio:.3f}")
    print(f"   eps drift vs float32 (relative L2): {entry['eps_rel_l2_vs_fp32']:.2e}")


if __name__ == "__main__":
    main()
