"""The inference fast path (ldmcli.fastpath) against the plain float32 path, on tiny random-weight models.

Tolerances (relative L2 unless said otherwise):
* float32 fast path (channels_last on the CPU, inference_mode) vs plain: 1e-5 for the UNet output and the decoded image
  (only the convolution algorithm's summation order differs);
* bf16 (fp16 on CUDA) weights vs float32: 3e-2 for one UNet output (conditioner in the same precision) and the
  decoded image (bf16 has 8 bits of mantissa: a relative rounding of 4e-3 per operation); a 4-step guided
  DPM-Solver++ image at least 30 dB PSNR;
* tiled decoding of a local (per-pixel) decoder: exact to 1e-6; one tile: bit-equal to the plain decode.
Never timing. Runs on the CPU, and also on CUDA where a GPU is present.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from ldmcli import fastpath
from ldmcli.errors import UsageError
from ldmcli.sampling import DiscreteSchedule, model_denoiser, sample_dpmpp_2m
from ldmcli.sampling.samplers import dpmpp_timesteps
from tinymodels import build_tiny, install_tiny

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOW = {"cpu": [torch.bfloat16], "cuda": [torch.bfloat16, torch.float16]}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tiny_txt2img(tmp_path_factory) -> torch.nn.Module:
    return build_tiny("txt2img", tmp_path_factory.mktemp("tiny_txt2img")).eval()


def _inputs(model, device, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g).to(device)
    t = torch.tensor([30, 700][:batch], device=device)
    return x, t


def test_prepare_casts_the_networks_and_keeps_the_schedule_float32(tiny_txt2img):
    model = fastpath.prepare_for_inference(copy.deepcopy(tiny_txt2img), dtype=torch.bfloat16)
    assert fastpath.network_dtype(model.model) == torch.bfloat16
    assert fastpath.network_dtype(model.first_stage_model) == torch.bfloat16
    assert fastpath.network_dtype(model.cond_stage_model) == torch.bfloat16
    assert model.alphas_cumprod.dtype == torch.float32 and model.betas.dtype == torch.float32
    assert fastpath.is_channels_last(model.model) and fastpath.is_channels_last(model.first_stage_model)  # CPU
    contiguous = fastpath.prepare_for_inference(copy.deepcopy(tiny_txt2img), channels_last=False)
    assert not fastpath.is_channels_last(contiguous.model) and contiguous.fast_path["channels_last"] is False
    assert not fastpath.is_channels_last(tiny_txt2img.model)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.fast_path["dtype"] == torch.bfloat16 and model.fast_path["channels_last"] is True
    assert model.fast_path["compiled"] is False
    # asked for: the conditioner in float32
    model = fastpath.prepare_for_inference(copy.deepcopy(tiny_txt2img), dtype=torch.bfloat16,
                                           conditioner_dtype=torch.float32)
    assert fastpath.network_dtype(model.cond_stage_model) == torch.float32


def test_prepare_rejects_what_it_cannot_prepare(tiny_txt2img):
    with pytest.raises(UsageError, match="LatentDiffusion"):
        fastpath.prepare_for_inference(torch.nn.Linear(2, 2))
    with pytest.raises(UsageError, match="floating point"):
        fastpath.prepare_for_inference(copy.deepcopy(tiny_txt2img), dtype=torch.int8)


def _conv_inputs_not_in(module: torch.nn.Module, fmt: torch.memory_format, run) -> list[str]:
    """Names of the convolutions whose input was not laid out as ``fmt`` during ``run()``."""
    bad: list[str] = []
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, inp, n=name: None if inp[0].is_contiguous(memory_format=fmt) else bad.append(n)
        )
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return bad


@pytest.mark.parametrize("device", DEVICES)
def test_every_convolution_sees_one_layout(tiny_txt2img, device):
    """One memory format throughout (channels_last on the CPU, contiguous on CUDA): no convolution gets an input in
    a layout other than its weights' (which would re-layout the weights on every call)."""
    model = fastpath.prepare_for_inference(copy.deepcopy(tiny_txt2img), device=device)
    channels_last = device == "cpu"
    assert model.fast_path["channels_last"] is channels_last
    assert fastpath.is_channels_last(model.model) is channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, t = _inputs(model, device)
    context = torch.randn(2, 77, 64, device=device)
    x_in = fastpath.fast_layout(model, x)
    with fastpath.inference_context():
        assert _conv_inputs_not_in(model.model, fmt, lambda: model.apply_model(x_in, t, context)) == []
        fs_fmt = torch.channels_last if model.fast_path["first_stage_channels_last"] else torch.contiguous_format
        bad = _conv_inputs_not_in(model.first_stage_model, fs_fmt, lambda: fastpath.decode_latents(model, x))
    # a plain (contiguous) decoder keeps upstream's attention layout; for a 1x1 kernel both layouts are the same
    assert all(model.first_stage_model.get_submodule(name).kernel_size == (1, 1) for name in bad)
    assert bad == [] or fs_fmt == torch.contiguous_format


@pytest.mark.parametrize("device", DEVICES)
def test_float32_fast_path_matches_plain(tiny_txt2img, device, monkeypatch):
    if device == "cuda":  # full float32 (cuDNN's default TF32 convolutions differ by ~4e-4 whatever the layout)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    plain = copy.deepcopy(tiny_txt2img).to(device)
    fast = fastpath.prepare_for_inference(copy.deepcopy(tiny_txt2img), device=device, dtype=torch.float32)
    x, t = _inputs(plain, device)
    with torch.no_grad():
        c = plain.get_learned_conditioning(["a red cube", "a blue ball"])
        want_eps = plain.apply_model(x, t, c)
        want_img = plain.decode_first_stage(x)
    with fastpath.inference_context():
        got_eps = fast.apply_model(fastpath.fast_layout(fast, x), t, c)
        got_img = fastpath.decode_latents(fast, x)
    assert got_eps.is_inference()
    assert rel(got_eps, want_eps) < 1e-5
    assert got_img.dtype == torch.float32 and rel(got_img, want_img) < 1e-5


@pytest.mark.parametrize("device,dtype", [(d, dt) for d in DEVICES for dt in LOW[d]])
def test_reduced_precision_stays_close_to_float32(tiny_txt2img, device, dtype):
    plain = copy.deepcopy(tiny_txt2img).to(device)
    fast = fastpath.prepare_for_inference(copy.deepcopy(tiny_txt2img), device=device, dtype=dtype)
    x, t = _inputs(plain, device, seed=3)
    with torch.no_grad():
        c = plain.get_learned_conditioning(["a red cube", "a blue ball"])
        want_eps = plain.apply_model(x, t, c)
        want_img = plain.decode_first_stage(x)
    with fastpath.inference_context():
        c_fast = fast.get_learned_conditioning(["a red cube", "a blue ball"])
        assert c_fast.dtype == dtype
        got_eps = fast.apply_model(fastpath.fast_layout(fast, x.to(dtype)), t, c_fast)
        got_img = fastpath.decode_latents(fast, x)
    assert got_eps.dtype == dtype
    assert rel(got_eps.float(), want_eps) < 3e-2
    assert rel(got_img, want_img) < 3e-2


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double().cpu().clamp(-1, 1) - b.double().cpu().clamp(-1, 1)) ** 2).mean())
    return 10 * torch.log10(torch.tensor(4.0 / mse)).item()


@pytest.mark.parametrize("device", DEVICES)
def test_guided_sampling_in_bf16_matches_float32_image(tiny_txt2img, device):
    """A whole guided DPM-Solver++ run: fast bf16 path vs the plain float32 path, same seed, >= 30 dB PSNR."""
    schedule = DiscreteSchedule.from_model(tiny_txt2img)
    steps = dpmpp_timesteps(schedule, 4)
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7)).to(device)
    images = []
    for prepare in (False, True):
        model = copy.deepcopy(tiny_txt2img).to(device)
        if prepare:
            fastpath.prepare_for_inference(model, device=device, dtype=torch.bfloat16)
        with fastpath.inference_context():
            cond = fastpath.unique_conditioning(model.get_learned_conditioning, ["a tree"])
            uncond = model.get_learned_conditioning([""])
            eps = model_denoiser(model, cond, uncond, 3.0, schedule=schedule)
            x = fastpath.fast_layout(model, x_t)
            z = sample_dpmpp_2m(eps, x, schedule, steps)
            assert z.dtype == torch.float32  # the sampler state stays float32
            images.append(fastpath.decode_latents(model, z))
    assert _psnr(images[1], images[0]) >= 30.0


def test_unique_conditioning_runs_each_prompt_once():
    calls: list[list[str]] = []

    def encode(prompts: list[str]) -> torch.Tensor:
        calls.append(list(prompts))
        return torch.stack([torch.full((3, 2), float(len(p))) for p in prompts])

    prompts = ["cat", "a dog", "cat", "cat", "a dog"]
    got = fastpath.unique_conditioning(encode, prompts)
    assert calls == [["cat", "a dog"]]
    assert torch.equal(got, torch.stack([torch.full((3, 2), float(len(p))) for p in prompts]))
    nested = fastpath.unique_conditioning(lambda ps: {"c": [encode(ps)]}, ["x", "x"])
    assert nested["c"][0].shape == (2, 3, 2)


def _local_decoder(z: torch.Tensor) -> torch.Tensor:
    """A decoder with no spatial context (nearest x4 upsampling, then a per-pixel map): tiling cannot change it."""
    up = F.interpolate(z, scale_factor=4, mode="nearest")
    return torch.tanh(up[:, :3] * 0.7 + up[:, 1:4] ** 2 * 0.1)


@pytest.mark.parametrize("shape,tile,overlap", [((1, 4, 20, 20), 8, 2), ((2, 4, 17, 29), 8, 3),
                                                ((1, 4, 16, 9), 6, 0), ((1, 4, 10, 10), 4, 3)])
def test_decode_tiled_blends_to_the_whole_decode_for_a_local_decoder(shape, tile, overlap):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    messages: list[str] = []
    got = fastpath.decode_tiled(_local_decoder, z, tile=tile, overlap=overlap, callback=messages.append)
    want = _local_decoder(z)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() < 1e-6
    assert len(messages) > 1 and messages[-1].startswith("decoded tile")


def test_decode_tiled_one_tile_is_the_plain_decode_and_bad_tiles_are_refused():
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(fastpath.decode_tiled(_local_decoder, z, tile=8, overlap=2), _local_decoder(z))
    for tile, overlap in ((0, 0), (4, 4), (4, -1)):
        with pytest.raises(UsageError, match="tile"):
            fastpath.decode_tiled(_local_decoder, z, tile=tile, overlap=overlap)


@pytest.mark.parametrize("family", ["txt2img", "cin"])
def test_decode_latents_matches_decode_first_stage(tmp_path, family):
    """KL and VQ (quantised once, before tiling) first stages; tiles that cover the latent give the plain decode."""
    model = build_tiny(family, tmp_path).eval()
    z = torch.randn(1, model.channels, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.decode_first_stage(z)
        assert rel(fastpath.decode_latents(model, z), want) < 1e-6
        assert rel(fastpath.decode_latents(model, z, tile=8), want) < 1e-6
        tiled = fastpath.decode_latents(model, torch.randn(1, model.channels, 12, 12), tile=8, overlap=4)
    assert tiled.shape == (1, 3, 48, 48) and torch.isfinite(tiled).all()


def test_compile_cache_lives_in_the_data_dir(data_home, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    target = fastpath.use_compile_cache()
    assert target == data_home / "cache" / "torch_compile" and target.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(target)
    # a cache directory the user chose is kept
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(data_home / "mine"))
    assert fastpath.use_compile_cache() == data_home / "mine"


def test_prepare_with_compile_compiles_the_unet_in_place(tiny_txt2img, data_home, monkeypatch):
    """Compilation is lazy (nothing runs here); the UNet is compiled in place so state_dict keys do not change, and
    convolutions are left to inductor (no eager packing)."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    fast = fastpath.prepare_for_inference(copy.deepcopy(tiny_txt2img), compile=True)
    assert fast.fast_path["compiled"] is True and fast.fast_path["packed_convolutions"] == 0
    assert fast.model.diffusion_model._compiled_call_impl is not None
    assert set(fast.state_dict()) == set(tiny_txt2img.state_dict())
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(data_home / "cache" / "torch_compile")


@pytest.mark.slow
def test_compiled_block_matches_eager(data_home, monkeypatch):
    """torch.compile with frozen weights on one UNet ResBlock (the UNet takes minutes to compile on 2 cores):
    float32 output within 1e-5 of eager; the cache is written under the data dir."""
    from ldmcli.models.unet import ResBlock

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    torch.manual_seed(0)
    block = ResBlock(32, 64, 0.0, out_channels=64).eval().requires_grad_(False)
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 64)
    with torch.no_grad():
        want = block(x, emb)
    fastpath.compile_module(block)
    with fastpath.inference_context():
        got = block(x, emb)
    assert rel(got, want) < 1e-5
    assert any((data_home / "cache" / "torch_compile").iterdir())


needs_mkldnn = pytest.mark.skipif(not fastpath.mkldnn_available(), reason="this torch build has no oneDNN")


@needs_mkldnn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cin,cout,k,stride,padding,bias", [(8, 16, 3, 1, 1, True), (16, 8, 1, 1, 0, True),
                                                             (8, 8, 3, 2, 0, True), (8, 24, 3, 1, 1, False)])
def test_packed_convolution_equals_eager(dtype, cin, cout, k, stride, padding, bias):
    """PackedConv2d: same oneDNN kernel with the weight reordered once. Equal to eager within float rounding
    (relative 1e-6 in float32, 1e-2 in bf16 where 1x1 eager convolutions may take another kernel), for inputs of
    another size than the one it was packed for, channels_last or contiguous, and with gradients on (eager path)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias).to(dtype)
    plain = copy.deepcopy(conv)
    assert fastpath.pack_convolutions(conv) == 1 and type(conv) is fastpath.PackedConv2d
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    with torch.inference_mode():
        for shape, cl in (((2, cin, 12, 12), True), ((1, cin, 7, 9), False), ((3, cin, 12, 12), True)):
            x = fastpath.to_memory_format(torch.randn(shape).to(dtype), cl)
            assert rel(conv(x).float(), plain(x).float()) < tol
    assert "_ldm_packed" in conv.__dict__
    assert set(conv.state_dict()) == set(plain.state_dict())
    copied = copy.deepcopy(conv)  # the opaque packed copy is dropped, not copied
    assert "_ldm_packed" not in copied.__dict__
    # training with gradients takes the ordinary path, and gradients flow
    conv.weight.requires_grad_(True)
    x = torch.randn(1, cin, 6, 6, dtype=dtype, requires_grad=True)
    conv(x).float().sum().backward()
    assert conv.weight.grad is not None and x.grad is not None
    fastpath.unpack_convolutions(conv)
    assert type(conv) is torch.nn.Conv2d and "_ldm_packed" not in conv.__dict__


@needs_mkldnn
def test_prepare_packs_on_cpu_and_the_weights_follow_a_cast(tiny_txt2img):
    model = fastpath.prepare_for_inference(copy.deepcopy(tiny_txt2img), dtype=torch.float32)
    convs = [m for m in model.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert model.fast_path["packed_convolutions"] == len(convs) > 0  # 1x1 included (packed for the call's shape)
    assert all(type(m) is fastpath.PackedConv2d for m in convs)
    # the float32 decoder stays plain (measured no faster packed)
    assert not any(isinstance(m, fastpath.PackedConv2d) for m in model.first_stage_model.modules())
    assert set(model.state_dict()) == set(tiny_txt2img.state_dict())
    x, t = _inputs(model, "cpu")
    c = torch.randn(2, 77, 64)
    with fastpath.inference_context():
        before = model.apply_model(fastpath.fast_layout(model, x), t, c)
        model.model.to(torch.bfloat16)  # a later cast repacks instead of using stale weights
        after = model.apply_model(fastpath.fast_layout(model, x.bfloat16()), t, c.bfloat16())
    assert rel(after.float(), before) < 3e-2
    assert fastpath.prepare_for_inference(copy.deepcopy(tiny_txt2img), pack=False).fast_path["packed_convolutions"] == 0


def _png_pixels(path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(__import__("numpy").asarray(image.convert("RGB")).copy())


def test_txt2img_tile_decode_option(cli, tmp_path, monkeypatch):
    """--tile-decode: one tile (small images) is the plain decode bit for bit; a 320x320 image (an 80x80 latent of the
    tiny f4 model, 4 tiles of 64) comes out whole. --compile is offered."""
    install_tiny("txt2img", monkeypatch)
    common = ("a red cube", "--model", "tiny-txt2img", "--n_samples", "1", "--seed", "3", "--steps", "1",
              "--skip-grid", "--precision", "fp32")
    for flag, out in (((), tmp_path / "plain"), (("--tile-decode",), tmp_path / "tiled")):
        r = cli("txt2img", *common, *flag, "--outdir", out)
        assert r.exit_code == 0, r
    assert torch.equal(_png_pixels(tmp_path / "plain/samples/00000.png"), _png_pixels(tmp_path / "tiled/samples/00000.png"))
    r = cli("txt2img", *common, "--H", "320", "--W", "320", "--tile-decode", "--outdir", tmp_path / "big")
    assert r.exit_code == 0, r
    assert _png_pixels(tmp_path / "big/samples/00000.png").shape == (320, 320, 3)
    assert "--compile" in cli("txt2img", "--help").stdout and "--tile-decode" in cli("sample", "--help").stdout


# --------------------------------------------------------------------------- one copy of the weights (issue 18)


def _weight_holders(model: torch.nn.Module) -> dict[str, list]:
    """Every place a weight of ``model`` lives: dense tensors (by storage) and packed convolution copies."""
    dense, packed = {}, []
    for m in model.modules():
        if isinstance(m, fastpath.PackedConv2d) and "_ldm_packed" in m.__dict__:
            packed.append(m)
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            if t.numel() and all(st == 0 for st in t.stride()) and t.dim() > 0:
                assert isinstance(m, fastpath.PackedConv2d) and m.dense_released and t.isnan().all()
                continue  # the zero-byte placeholder of a weight held packed
            dense.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    return {"dense": list(dense.values()), "packed": packed}


@needs_mkldnn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepare_leaves_one_copy_of_each_weight(tmp_path, dtype):
    """A model loaded from a memory-mapped .safetensors, prepared on the CPU: no weight is left in the file's map,
    each tensor has its own storage (none held twice), and after a sampling step and a decode every convolution
    holds its weight once, packed for the shape it was called with (the parameter is a zero-byte placeholder), yet
    state_dict() gives back exactly the loaded weights."""
    from ldmcli.loading import load_model
    from tinymodels import install_bert_vocab, write_tiny

    install_bert_vocab()
    files = write_tiny("txt2img", tmp_path, ckpt=False, safetensors=True)
    model = load_model(files.config, ckpt=files.safetensors)
    maps = fastpath._file_mappings()
    assert any(fastpath._in_file_map(t, maps) for t in model.state_dict().values())  # loaded as views of the file
    want = {k: v.clone() for k, v in model.state_dict().items()}
    n_before = sum(group[0].numel() for group in _weight_holders(model)["dense"])
    fastpath.prepare_for_inference(model, dtype=dtype)
    holders = _weight_holders(model)
    assert not holders["packed"] and all(len(group) == 1 for group in holders["dense"])  # packing waits for a call
    with fastpath.inference_context():
        z = fastpath.fast_layout(model, torch.randn(1, model.channels, 8, 8, dtype=dtype))
        model.apply_model(z, torch.tensor([10]), model.get_learned_conditioning(["a cube"]))
        fastpath.decode_latents(model, z, tile=None)
    holders = _weight_holders(model)
    maps = fastpath._file_mappings()
    tensors = [t for group in holders["dense"] for t in group]
    assert not any(fastpath._in_file_map(t, maps) for t in tensors)
    assert all(len(group) == 1 for group in holders["dense"])  # one storage per tensor: nothing held twice
    called = (model.model, model.first_stage_model.decoder, model.first_stage_model.post_quant_conv)
    if not model.fast_path["plan"]["first_stage"].pack:  # the float32 decoder stays plain (dense, one copy)
        called = called[:1]
    convs = [m for net in called for m in net.modules()
             if isinstance(m, torch.nn.Conv2d)]  # the encoder's are not called: dense, one copy
    assert convs and all(isinstance(m, fastpath.PackedConv2d) and m.dense_released for m in convs)
    assert len(holders["packed"]) == len(convs)
    assert all(m.__dict__["_ldm_packed"][0][2:] in ((8, 8), (16, 16), (32, 32), (4, 4), (2, 2), (1, 1)) for m in convs)
    n_dense = sum(t.numel() for t in tensors)
    n_packed = sum(m.weight.numel() for m in convs)
    assert n_dense + n_packed == n_before
    got = model.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        expect = value.to(dtype) if value.is_floating_point() and not key.startswith(("betas", "alphas", "sqrt",
                                                                                        "log_one", "posterior",
                                                                                        "scale_factor")) else value
        assert got[key].dtype == expect.dtype and torch.equal(got[key], expect), key


@needs_mkldnn
def test_weight_held_only_packed_comes_back_for_everything_that_reads_it():
    """A convolution whose weight lives only packed: same output as eager; state_dict, deepcopy, .to(), loading a
    state_dict and the ordinary (training) path all see the real weight, never the placeholder."""
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(8, 16, 3, padding=1).to(memory_format=torch.channels_last).requires_grad_(False)
    conv = copy.deepcopy(plain)
    assert fastpath.pack_convolutions(conv, release_dense=True) == 1 and not conv.dense_released  # packs when called
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert rel(conv(x), plain(x)) < 1e-6
    assert conv.dense_released and conv.__dict__["_ldm_packed"][0] == (2, 8, 10, 10)  # packed for this input
    assert conv.weight.untyped_storage().nbytes() <= 4 and conv.weight.isnan().all()
    with torch.inference_mode():  # another input shape: packed again for it, from the packed copy, exactly
        small = torch.randn(1, 8, 5, 7).contiguous(memory_format=torch.channels_last)
        assert rel(conv(small), plain(small)) < 1e-6
        assert conv.__dict__["_ldm_packed"][0] == (1, 8, 5, 7) and conv.dense_released
        assert rel(conv(x), plain(x)) < 1e-6
        packed = conv.__dict__["_ldm_packed"]
        assert rel(conv(x[:1]), plain(x[:1])) < 1e-6  # another batch size alone: no repacking
        assert conv.__dict__["_ldm_packed"] is packed
    assert torch.equal(conv.state_dict()["weight"], plain.weight)
    assert fastpath.is_channels_last(conv)
    copied = copy.deepcopy(conv)
    assert not copied.dense_released and torch.equal(copied.weight, plain.weight)
    assert conv.dense_released  # copying did not unpack the original
    doubled = copy.deepcopy(conv).to(torch.float64)
    assert doubled.weight.dtype == torch.float64 and torch.equal(doubled.weight, plain.weight.double())
    loaded = copy.deepcopy(conv)
    loaded.pack_now(release_dense=True)
    loaded.load_state_dict({"weight": plain.weight * 2, "bias": plain.bias})
    assert not loaded.dense_released and torch.equal(loaded.weight, plain.weight * 2)
    with torch.enable_grad():  # gradients wanted: the ordinary path, with the real weight
        conv.weight.requires_grad_(True)
        out = conv(x.requires_grad_(True))
    assert not conv.dense_released and conv.weight.requires_grad and torch.equal(conv.weight, plain.weight)
    assert rel(out, plain(x)) < 1e-6


def test_choose_plan_per_device_and_cpu_kind(tiny_txt2img, monkeypatch):
    from ldmcli.devices import CpuKind

    avx2 = CpuKind("AVX2", False, False, None, False)
    mixed = {"unet": fastpath.StagePlan(True, True), "first_stage": fastpath.StagePlan(False, False)}
    monkeypatch.setattr(fastpath, "_CPU_PLANS", {("avx2", "float32"): mixed})
    assert fastpath.choose_plan("cpu", torch.float32, avx2) == mixed
    assert fastpath.choose_plan("cpu", torch.bfloat16, avx2) == fastpath._CPU_DEFAULT
    model = fastpath.prepare_for_inference(copy.deepcopy(tiny_txt2img), dtype=torch.float32, plan=mixed)
    assert fastpath.is_channels_last(model.model) and not fastpath.is_channels_last(model.first_stage_model)
    assert not any(isinstance(m, fastpath.PackedConv2d) for m in model.first_stage_model.modules())
    assert model.fast_path["first_stage_channels_last"] is False and model.fast_path["channels_last"] is True
    x = torch.randn(1, 4, 8, 8)
    with fastpath.inference_context():  # the decoder gets its own layout (a 1x1 kernel is the same in both)
        bad = _conv_inputs_not_in(model.first_stage_model, torch.contiguous_format,
                                  lambda: fastpath.decode_latents(model, x))
    assert all(model.first_stage_model.get_submodule(name).kernel_size == (1, 1) for name in bad)
    monkeypatch.undo()

    gpu = fastpath.choose_plan("cuda", torch.float16)
    assert gpu["unet"] == gpu["first_stage"] == fastpath.StagePlan(False, False)
    for key in ("avx2", "avx512-bf16", "amx", "avx512"):
        kind = CpuKind(key.split("-")[0].upper(), key.endswith("bf16"), key == "amx", None, False)
        for dtype in (torch.float32, torch.bfloat16):
            plan = fastpath.choose_plan("cpu", dtype, kind)
            assert set(plan) == {"unet", "first_stage"}
            # measured: channels_last + packed for the call's shape is faster everywhere, AVX2 included
            assert plan["unet"].channels_last and plan["unet"].pack == fastpath.mkldnn_available()
            if key == "avx2" and dtype == torch.float32:  # measured: the decoder gains nothing there
                assert plan["first_stage"] == fastpath.StagePlan(False, False)


def test_resolve_precision_on_a_cpu_without_native_bf16(monkeypatch):
    """issue 14 item 7: "auto" picks float32 where bf16 is not native (mocked flags, or oneDNN held at AVX2 as in an
    emulated AVX2 machine); asking for bf16 there works but warns once per process, naming fp32."""
    import warnings

    from ldmcli import devices

    cpu = torch.device("cpu")
    avx2 = frozenset({"avx", "avx2", "fma"})
    assert devices.resolve_precision("auto", cpu, cpu_flags_override=avx2) == torch.float32
    monkeypatch.setattr(devices, "cpu_flags", lambda *a, **k: avx2)
    assert devices.resolve_precision("auto", cpu) == torch.float32
    monkeypatch.setattr(devices, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match=r"not native on this CPU.*fp32"):
        assert devices.resolve_precision("bf16", cpu) == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert devices.resolve_precision("bf16", cpu) == torch.bfloat16  # once per process
    # a native-bf16 CPU whose oneDNN is held at AVX2 (ONEDNN_MAX_CPU_ISA) emulates bf16: auto is float32 there too
    native = frozenset({"avx2", "avx512f", "avx512_bf16"})
    assert devices.resolve_precision("auto", cpu, cpu_flags_override=native) == torch.bfloat16
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert devices.resolve_precision("auto", cpu, cpu_flags_override=native) == torch.float32
    kind = devices.cpu_kind(native)
    assert not kind.native_bf16 and kind.emulated
    assert "emulated" in kind.describe() and "no native bf16" in kind.describe()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert devices.resolve_precision("auto", cpu, cpu_flags_override=native) == torch.bfloat16


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_released_map_pages_leave_rss_and_read_back_from_the_file(tmp_path):
    """What keeps prepare's peak at one copy: after a mapped tensor is copied, its pages are dropped from RSS (and
    would be read back from the file, unchanged, if touched again)."""
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    n = 8 * 2**20  # 32 MB of float32
    values = torch.arange(n, dtype=torch.float32)
    path = tmp_path / "weights.bin"
    values.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=n, dtype=torch.float32)
    assert fastpath._in_file_map(mapped, fastpath._file_mappings())
    assert not fastpath._in_file_map(values, fastpath._file_mappings())
    assert float(mapped.sum()) == float(values.sum())  # every page touched: resident
    before = rss()
    fastpath._release_pages(mapped)
    assert before - rss() > 24 * 2**20
    assert torch.equal(mapped, values)
