"""Device check for the first stages (not a test): CPU vs CUDA parity in float32, half-precision round trips,
SDPA vs explicit attention at zoo sizes, the training losses on CUDA, and decode timings. Prints ratios/errors.

Run from the repository root: ``python benchmarks/first_stage_device_check.py`` (random weights; needs CUDA).
"""

from __future__ import annotations

import time

import torch

from ldmcli.models import losses
from ldmcli.models.autoencoder import AttnBlock, AutoencoderKL, VQModel

BASE = dict(resolution=256, in_channels=3, out_ch=3, ch=128, num_res_blocks=2, dropout=0.0)
ZOO = {  # (ddconfig, extra params) of the zoo first stages used here
    "kl-f8": (dict(BASE, double_z=True, z_channels=4, ch_mult=[1, 2, 4, 4], attn_resolutions=[]), dict(embed_dim=4)),
    "vq-f4": (dict(BASE, double_z=False, z_channels=3, ch_mult=[1, 2, 4], attn_resolutions=[]),
              dict(embed_dim=3, n_embed=8192)),
    "vq-f8": (dict(BASE, double_z=False, z_channels=4, ch_mult=[1, 2, 2, 4], attn_resolutions=[32]),
              dict(embed_dim=4, n_embed=16384)),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def build(name: str, cls):
    ddconfig, extra = ZOO[name]
    torch.manual_seed(0)
    return cls(ddconfig=ddconfig, **extra).eval()


def main() -> None:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    print("device", torch.cuda.get_device_name(0), "torch", torch.__version__)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 256, 256, generator=g) * 2 - 1

    for name, cls in (("kl-f8", AutoencoderKL), ("vq-f4", VQModel), ("vq-f8", VQModel)):
        model = build(name, cls)
        with torch.no_grad():
            t = time.time()
            if cls is AutoencoderKL:
                z_cpu = model.encode(x).mode()
            else:
                z_cpu = model.encode_to_prequant(x)
            y_cpu = model.decode(z_cpu)
            t_cpu = time.time() - t
            model.to(dev)
            z_gpu = model.encode(x.to(dev)).mode() if cls is AutoencoderKL else model.encode_to_prequant(x.to(dev))
            y_gpu = model.decode(z_cpu.to(dev))
            torch.cuda.synchronize()
        print(f"{name}: fp32 cpu-vs-cuda rel err latent {rel(z_gpu, z_cpu):.2e} decode {rel(y_gpu, y_cpu):.2e}"
              f" (cpu encode+decode {t_cpu:.2f}s)")
        for dtype in (torch.float16, torch.bfloat16):
            m = build(name, cls).to(dev, dtype)
            with torch.no_grad():
                if cls is AutoencoderKL:
                    out, post = m(x.to(dev, dtype), generator=torch.Generator().manual_seed(1))
                else:
                    out, _ = m(x.to(dev, dtype))
                ref = y_cpu
                yd = m.decode(z_cpu.to(dev, dtype))
            print(f"  {dtype}: forward dtype {out.dtype} finite {bool(torch.isfinite(out).all())}; "
                  f"decode rel err vs fp32 {rel(yd.float(), ref):.2e}")
        del model

    # decode timings on the GPU (kl-f8, fp32 and fp16), latents of 256^2 and 512^2 images
    model = build("kl-f8", AutoencoderKL).to(dev)
    for size in (256, 512):
        z = torch.randn(4, 4, size // 8, size // 8, device=dev)
        for dtype in (torch.float32, torch.float16):
            m = model.to(dtype)
            with torch.no_grad():
                m.decode(z.to(dtype))
                torch.cuda.synchronize()
                t = time.time()
                for _ in range(3):
                    m.decode(z.to(dtype))
                torch.cuda.synchronize()
            print(f"kl-f8 decode 4x{size}^2 {dtype}: {(time.time() - t) / 3 * 1000:.1f} ms/batch, "
                  f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        model.float()

    # SDPA vs explicit softmax at the size of vq-f4's middle attention (4096 tokens x 512 ch)
    torch.manual_seed(0)
    block = AttnBlock(512).to(dev)
    h = torch.randn(1, 512, 64, 64, device=dev)
    with torch.no_grad():
        hn = block.norm(h)
        q, k, v = block.q(hn), block.k(hn), block.v(hn)
        b, c, hh, ww = q.shape
        w = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c**-0.5
        w = torch.softmax(w, dim=2)
        out = torch.bmm(v.reshape(b, c, -1), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        explicit = h + block.proj_out(out)
        print(f"AttnBlock 64x64x512 SDPA vs explicit rel err (cuda fp32): {rel(block(h), explicit):.2e}")

    # losses on CUDA: generator and discriminator steps, LPIPS with random weights, adaptive weight
    dd = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=64, ch_mult=[1, 2],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    torch.manual_seed(0)
    loss = losses.LPIPSWithDiscriminator(disc_start=0, kl_weight=1e-6, disc_weight=0.5)
    with torch.no_grad():
        for p in loss.perceptual_loss.parameters():
            p.normal_(0, 0.05)
    loss.perceptual_loss.pretrained = True
    ae = AutoencoderKL(dd, 4, loss=loss).to(dev).train()
    xi = (torch.rand(2, 3, 64, 64, device=dev) * 2 - 1)
    rec, post = ae(xi, generator=torch.Generator(device=dev).manual_seed(0))
    l0, log0 = ae.loss(xi, rec, post, 0, 1, last_layer=ae.get_last_layer())
    l0.backward()
    l1, log1 = ae.loss(xi, rec.detach(), post, 1, 1)
    l1.backward()
    print("KL loss on cuda:", {k: round(float(v), 4) for k, v in {**log0, **log1}.items()})
    vq = VQModel({**dd, "double_z": False}, 64, 4,
                 loss=losses.VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0)).to(dev).train()
    rec, ql = vq(xi)
    l0, log0 = vq.loss(ql, xi, rec, 0, 1, last_layer=vq.get_last_layer())
    l0.backward()
    print("VQ loss on cuda:", {k: round(float(v), 4) for k, v in log0.items()})


if __name__ == "__main__":
    main()
