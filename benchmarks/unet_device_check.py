"""Device check for the LDM UNet and LatentDiffusion (not a test): CPU vs accelerator parity in float32, the fused
SDPA path against upstream's explicit softmax attention, bf16/fp16 drift against float32, channels_last against
contiguous, and UNet step timings (median of several runs). Prints errors and ratios.

Run from the repository root: ``python benchmarks/unet_device_check.py`` (random weights; uses CUDA when present,
else the CPU). ``--tiny`` shrinks every model to check the script itself in seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from einops import rearrange

from ldmcli.models.unet import UNetModel

# Zoo UNet architectures (from the upstream configs): txt2img-f8-large, celeba256 (plain attention), cin256-v2.
ARCH = {
    "txt2img-f8-large": dict(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                             attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
                             num_heads=8, use_spatial_transformer=True, transformer_depth=1, context_dim=1280,
                             use_checkpoint=True, legacy=False),
    "celeba256": dict(image_size=64, in_channels=3, out_channels=3, model_channels=224,
                      attention_resolutions=[8, 4, 2], num_res_blocks=2, channel_mult=[1, 2, 3, 4],
                      num_head_channels=32),
    "cin256-v2": dict(image_size=64, in_channels=3, out_channels=3, model_channels=192,
                      attention_resolutions=[8, 4, 2], num_res_blocks=2, channel_mult=[1, 2, 3, 5], num_heads=1,
                      use_spatial_transformer=True, transformer_depth=1, context_dim=512),
}
TINY = dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def explicit_sdpa(q, k, v, attn_mask=None, scale=None, **_):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    w = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    return torch.einsum("bhij,bhjd->bhid", w.float().softmax(dim=-1).to(v.dtype), v)


def build(name: str, tiny: bool) -> tuple[UNetModel, dict]:
    params = dict(ARCH[name], **(TINY if tiny else {}))
    if tiny and params.get("context_dim"):
        params["context_dim"] = 32
    torch.manual_seed(0)
    model = UNetModel(**params).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PyTorch's default init, but no zero layers (zero-initialised outputs would hide errors)
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model, params


def inputs(params: dict, batch: int, tiny: bool) -> dict:
    g = torch.Generator().manual_seed(2)
    size = 8 if tiny else params["image_size"]
    out = dict(x=torch.randn(batch, params["in_channels"], size, size, generator=g),
               timesteps=torch.tensor([981, 421][:batch] * (batch // 2 or 1))[:batch])
    if params.get("context_dim"):
        tokens = 77 if params["context_dim"] == 1280 or tiny else 1
        out["context"] = torch.randn(batch, tokens, params["context_dim"], generator=g)
    return out


def to(kw: dict, device, dtype=None, channels_last=False) -> dict:
    res = {}
    for k, v in kw.items():
        v = v.to(device)
        if v.is_floating_point() and dtype is not None:
            v = v.to(dtype)
        if channels_last and v.dim() == 4:
            v = v.contiguous(memory_format=torch.channels_last)
        res[k] = v
    return res


def timed(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--skip-cpu", action="store_true", help="no CPU reference (parity then only vs explicit attention)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print("device", torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch", torch.__version__,
          "threads", torch.get_num_threads())

    for name in ARCH:
        model, params = build(name, args.tiny)
        n_params = sum(p.numel() for p in model.parameters())
        kw = inputs(params, 2, args.tiny)
        with torch.inference_mode():
            ref_cpu = None
            if not args.skip_cpu or dev.type == "cpu":
                t = time.perf_counter()
                ref_cpu = model(**kw)
                t_cpu = time.perf_counter() - t
            model.to(dev)
            out = model(**to(kw, dev))
            with torch.inference_mode():
                orig = F.scaled_dot_product_attention  # the one function both model modules call
                F.scaled_dot_product_attention = explicit_sdpa
                try:
                    explicit = model(**to(kw, dev))
                finally:
                    F.scaled_dot_product_attention = orig
            line = f"{name} ({n_params / 1e6:.1f}M params): SDPA vs explicit softmax rel err {rel(out, explicit):.2e}"
            if ref_cpu is not None and dev.type != "cpu":
                line += f"; {dev.type} vs cpu fp32 rel err {rel(out, ref_cpu):.2e} (cpu step {t_cpu:.2f}s)"
            print(line)
            cl_model = model.to(memory_format=torch.channels_last)
            out_cl = cl_model(**to(kw, dev, channels_last=True))
            print(f"  channels_last vs contiguous rel err {rel(out_cl, out):.2e}; "
                  f"output channels_last {out_cl.is_contiguous(memory_format=torch.channels_last)}")
            dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if dev.type == "cuda" else [])
            timings = {}
            for dtype in dtypes:
                m = model.to(dtype)
                for cl in (False, True):
                    m = m.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
                    args_d = to(kw, dev, dtype, channels_last=cl)
                    y = m(**args_d)
                    if not cl and dtype != torch.float32:
                        finite = bool(y.isfinite().all())
                        print(f"  {dtype}: rel err vs fp32 {rel(y.float(), out):.2e}, finite {finite}")
                    if args.no_timing:
                        continue
                    timings[(dtype, cl)] = timed(lambda: m(**args_d), args.repeats, dev)
            model.float()
            base = timings.get((torch.float32, False), 1.0)
            for (dtype, cl), s in timings.items():
                print(f"  step batch 2 {str(dtype)[6:]:9s} {'channels_last' if cl else 'contiguous   '}: "
                      f"{s * 1000:8.1f} ms  ({base / s:.2f}x fp32 contiguous)")
        del model
        if dev.type == "cuda":
            print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
            torch.cuda.reset_peak_memory_stats()

    # LatentDiffusion on the device: loss, backward, EMA update and ema_scope with CPU generators
    from ldmcli.models.autoencoder import AutoencoderKL
    from ldmcli.models.ddpm import LatentDiffusion

    dd = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    unet = UNetModel(image_size=16, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                     attention_resolutions=[2], channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
                     context_dim=16, use_checkpoint=True)
    ldm = LatentDiffusion(unet, AutoencoderKL(dd, 4), torch.nn.Identity(), conditioning_key="crossattn",
                          timesteps=1000, linear_start=0.00085, linear_end=0.012, scale_factor=0.18215).to(dev)
    ldm.train()
    x = torch.rand(2, 3, 32, 32, device=dev) * 2 - 1
    z = ldm.get_first_stage_encoding(ldm.encode_first_stage(x), generator=torch.Generator().manual_seed(0))
    loss, logs = ldm(z, torch.randn(2, 5, 16, device=dev), generator=torch.Generator().manual_seed(1))
    loss.backward()
    ldm.model_ema(ldm.model)
    with ldm.ema_scope():
        pass
    ldm.to(torch.bfloat16)
    print(f"LatentDiffusion on {dev.type}: loss {loss.item():.4f}, schedule dtype after bf16 cast "
          f"{ldm.alphas_cumprod.dtype}, decode {tuple(ldm.decode_first_stage(z.bfloat16()).shape)}")

    # the channels_last stride accident: upstream's token->image rearrange behind a contiguous input
    x = torch.randn(2, 320, 32, 32, device=dev)
    tokens = rearrange(x, "b c h w -> b (h w) c").contiguous()  # what a transformer block hands back
    back = rearrange(tokens, "b (h w) c -> b c h w", h=32, w=32)
    print("rearrange back from tokens is contiguous:", back.is_contiguous(),
          "| channels_last-strided:", back.is_contiguous(memory_format=torch.channels_last))


if __name__ == "__main__":
    main()
