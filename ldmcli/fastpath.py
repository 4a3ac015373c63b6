"""The inference fast path for latent diffusion (Rombach et al., CVPR 2022): what makes sampling cheap without
changing what is computed.

* **One memory format.** Upstream's token->image ``rearrange`` leaves a channels_last-strided tensor behind a
  contiguous one, so convolutions re-layout their weights on every call. Here every feature map keeps one layout (the
  modules keep their input's format), so no convolution copies weights (:func:`prepare_for_inference`). On the CPU
  that layout is ``channels_last`` (weights and inputs; oneDNN's native layout). On CUDA it stays contiguous: CUDA's
  GroupNorm returns contiguous tensors, so channels_last would be converted back and forth around every norm, and on
  an H200 it gained nothing measurable (fp16/bf16 UNet step within 1.5%).
* **Reduced precision where it is native.** bf16 (or fp16 on GPUs) weights for the UNet *and* the first stage;
  GroupNorm of the UNet still normalises in float32 as upstream, the sampler state and the schedules stay float32
  (:func:`ldmcli.sampling.model_denoiser` casts at the network's boundary). The conditioner (BERT/CLIP) runs once per
  distinct prompt, in the same precision (txt2img-f8-large's BERT in bf16: 2.5x faster on a CPU, its output within
  1.4e-2 relative L2 of float32, like the UNet's eps; ``conditioner_dtype=torch.float32`` keeps it float32).
* **Convolution weights packed once** (CPU): eager PyTorch reorders each convolution's weight into oneDNN's layout
  on every call, which costs more than the arithmetic at the UNet's low resolutions; :class:`PackedConv2d` keeps the
  reordered copy (what inductor's freezing does, without compiling).
* **No autograd.** ``torch.inference_mode`` (:func:`inference_context`); gradient-checkpoint wrappers are only taken
  while training, so ``eval()`` removes them.
* **Optional ``torch.compile``** of the UNet with frozen weights (inductor ``freezing``), the compile cache kept in
  ``<data dir>/cache/torch_compile`` so the second run starts fast (:func:`compile_cache_dir`).
* **Tiled decoding** for images whose decoder activations do not fit (:func:`decode_tiled`): overlapping latent
  tiles blended with linear ramps, as in diffusers' ``enable_vae_tiling``. Tiles normalise their own GroupNorm
  statistics, so a tiled decode differs slightly from a whole one (seams are blended, not removed); with one tile it
  is exactly the plain decode.

Nothing here prints; ``callback(message)`` gets a line per stage.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import nn

from ldmcli import paths
from ldmcli.errors import UsageError

Callback = Callable[[str], None]

#: latent tile (side, in latent pixels) and overlap used by ``--tile-decode``: 512x512 image tiles for an f8 stage
DEFAULT_TILE = 64
DEFAULT_OVERLAP = 16
#: the inductor option that lets compiled graphs treat the (frozen) weights as constants
COMPILE_OPTIONS: dict[str, Any] = {"freezing": True}


# ------------------------------------------------------------------------------------------------- memory format


def _memory_format(enabled: bool) -> torch.memory_format:
    return torch.channels_last if enabled else torch.contiguous_format


def default_channels_last(device: str | torch.device | None) -> bool:
    """The fast path's layout on ``device``: channels_last on the CPU, contiguous elsewhere (see the module doc)."""
    return torch.device(device if device is not None else "cpu").type == "cpu"


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in ``channels_last`` (4-D tensors only) or plain contiguous layout."""
    if x.dim() != 4:
        return x
    return x.contiguous(memory_format=_memory_format(channels_last))


def is_channels_last(module: nn.Module) -> bool:
    """True when every 4-D weight of ``module`` (its convolutions) is stored channels_last."""
    weights = [p for p in module.parameters() if p.dim() == 4 and p.shape[2] * p.shape[3] > 1]
    return bool(weights) and all(
        p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in weights
    )


def network_dtype(module: nn.Module | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of ``module``'s first floating parameter (``default`` for a parameterless one)."""
    if module is None:
        return default
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


# ------------------------------------------------------------------------------------------ packed convolutions


def mkldnn_available() -> bool:
    """True when this torch build has oneDNN (mkldnn) for CPU convolutions."""
    return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


class PackedConv2d(nn.Conv2d):
    """``nn.Conv2d`` that, at CPU inference, runs oneDNN on a weight reordered once into oneDNN's blocked layout.

    Eager PyTorch reorders every convolution's weight on every call; for the UNet's low-resolution levels (a
    1280x2560x3x3 kernel over 4x4 pixels) that costs more than the arithmetic. Packing once is what inductor's
    ``freezing`` does; here it happens in eager mode. Same oneDNN kernel, same result (bit-identical in the tests).
    Parameters and state_dict are untouched (the packed copy is a cache, rebuilt when the weight changes); training,
    other devices and dtypes, and non-zero padding modes take the ordinary path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed(x)
        if packed is None:
            return super().forward(x)
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups, "none", [],
            "",
        )

    def _packed(self, x: torch.Tensor) -> torch.Tensor | None:
        w = self.weight
        if (
            x.device.type != "cpu" or x.dim() != 4 or x.dtype != w.dtype or w.dtype not in (torch.float32, torch.bfloat16)
            or self.padding_mode != "zeros" or isinstance(self.padding, str)
            or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
        ):
            return None
        key = (w.data_ptr(), w.dtype, tuple(w.shape))
        cache = self.__dict__.get("_ldm_packed")
        if cache is None or cache[0] != key:
            try:
                packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    w.detach().to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                    list(x.shape),
                )
            except (RuntimeError, NotImplementedError):  # a configuration oneDNN cannot pack: stay eager
                packed = None
            cache = (key, packed)
            self.__dict__["_ldm_packed"] = cache
        return cache[1]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state = dict(state)
        state.pop("_ldm_packed", None)  # an opaque oneDNN tensor: rebuilt on the next call
        return state


def pack_convolutions(module: nn.Module) -> int:
    """Make every plain ``nn.Conv2d`` in ``module`` a :class:`PackedConv2d` (in place); returns how many.

    The class is swapped on the existing objects, so names, parameters and state_dict keys stay as they are. Each
    convolution then holds its weight twice (the parameter and the packed copy) once it has run.
    """
    if not mkldnn_available():
        return 0
    count = 0
    for m in module.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = PackedConv2d
            count += 1
    return count


def unpack_convolutions(module: nn.Module) -> None:
    """Undo :func:`pack_convolutions` (plain ``nn.Conv2d`` again, packed copies dropped)."""
    for m in module.modules():
        if type(m) is PackedConv2d:
            m.__dict__.pop("_ldm_packed", None)
            m.__class__ = nn.Conv2d


# ------------------------------------------------------------------------------------------------- compile cache


def compile_cache_dir() -> Path:
    """Where ``torch.compile`` keeps its caches for ldmcli: ``<data dir>/cache/torch_compile`` (safe to delete)."""
    return paths.cache_dir() / "torch_compile"


def use_compile_cache(directory: str | os.PathLike | None = None) -> Path:
    """Point inductor's (and Triton's) on-disk caches at ``directory`` (default :func:`compile_cache_dir`).

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` whenever it compiles, so this is a process setting by nature. A value
    the user exported (other than torch's own default) is respected and returned instead.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current and os.path.abspath(current) != os.path.abspath(default_cache_dir()):
        if directory is None:
            return Path(current)
    target = Path(directory) if directory is not None else compile_cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(target)
    os.environ.setdefault("TRITON_CACHE_DIR", str(target / "triton"))
    return target


def compile_module(
    module: nn.Module, *, mode: str | None = None, freeze: bool = True, cache_dir: str | os.PathLike | None = None
) -> nn.Module:
    """Compile ``module`` in place (``nn.Module.compile``: state_dict keys unchanged) for inference.

    ``freeze`` lets inductor fold the weights as constants (they must not change afterwards; it needs
    ``torch.inference_mode``/``no_grad`` at call time). Shapes are static: a new image size recompiles.
    """
    use_compile_cache(cache_dir)
    options = dict(COMPILE_OPTIONS) if freeze else {}
    if mode is not None and options:
        # torch.compile takes either a mode or options; freezing is the option that matters on the CPU
        raise UsageError("compile_module: pass mode= or freeze=True, not both")
    if options:
        module.compile(dynamic=False, options=options)
    else:
        module.compile(dynamic=False, mode=mode)
    return module


# ----------------------------------------------------------------------------------------------------- prepare


def _first_stage(model: nn.Module) -> nn.Module | None:
    fs = getattr(model, "first_stage_model", None)
    return fs if isinstance(fs, nn.Module) else None


def _unet_wrapper(model: nn.Module) -> nn.Module:
    wrapper = getattr(model, "model", None)
    if not isinstance(wrapper, nn.Module):
        raise UsageError("prepare_for_inference expects a LatentDiffusion model (with .model and .first_stage_model)")
    return wrapper


def prepare_for_inference(
    model: nn.Module,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    channels_last: bool | None = None,
    conditioner_dtype: torch.dtype | None = None,
    pack: bool | None = None,
    compile: bool = False,
    compile_mode: str | None = None,
    callback: Callback | None = None,
) -> nn.Module:
    """Ready a loaded ``LatentDiffusion`` for fast sampling, in place, and return it.

    ``dtype`` (None: keep): the UNet's and the first stage's weights. ``conditioner_dtype`` (None: same as
    ``dtype``): the conditioner's (one that *is* the first stage follows the first stage). The LDM's schedule buffers stay float32. ``channels_last`` (None: True on the CPU,
    False on GPUs, :func:`default_channels_last`) puts every convolution weight in that layout (feed inputs with
    :func:`to_memory_format`, or :func:`fast_layout`, which reads the choice back from the model). ``pack`` (None:
    on the CPU unless compiling) makes the convolutions of the UNet and the first stage :class:`PackedConv2d`. ``compile`` compiles the UNet with frozen
    weights (see :func:`compile_module`); the first call then takes minutes on a CPU, later runs reuse the cache.
    Gradients are switched off and the model is put in eval mode (no checkpoint wrappers).
    """
    if dtype is not None and not dtype.is_floating_point:
        raise UsageError(f"dtype must be a floating point type, not {dtype}")
    wrapper = _unet_wrapper(model)
    first_stage = _first_stage(model)
    cond = getattr(model, "cond_stage_model", None)
    model.eval()
    model.requires_grad_(False)
    target = torch.device(device) if device is not None else None
    where = target if target is not None else next((p.device for p in wrapper.parameters()), torch.device("cpu"))
    if channels_last is None:
        channels_last = default_channels_last(where)
    fmt = _memory_format(channels_last)

    if callback:
        what = f"{str(dtype).removeprefix('torch.')} weights" if dtype is not None else "weights as loaded"
        callback(f"preparing for inference: {what}, {'channels_last' if channels_last else 'contiguous'}")
    # each network is cast and re-laid out in one .to() per module, one module at a time (no second full copy)
    networks: list[nn.Module] = [wrapper]
    if first_stage is not None:
        networks.append(first_stage)
    for net in networks:
        net.to(device=target, dtype=dtype, memory_format=fmt)
    if isinstance(cond, nn.Module) and cond is not first_stage:
        cond.to(device=target, dtype=conditioner_dtype if conditioner_dtype is not None else dtype)
    if target is not None:
        model.to(target)  # schedule buffers; LatentDiffusion keeps them float32
    if dtype not in (None, torch.float32) or where.type != "cpu":
        from ldmcli.loading import release_checkpoint

        release_checkpoint(model)  # the float32 file's memory map is no longer needed
    if pack is None:
        pack = where.type == "cpu" and not compile
    packed = 0
    if pack:
        packed = sum(pack_convolutions(net) for net in networks)
    if compile:
        unet = getattr(wrapper, "diffusion_model", wrapper)
        if callback:
            callback(f"compiling the UNet (cache: {compile_cache_dir()}); the first step takes a while")
        compile_module(unet, mode=compile_mode, freeze=compile_mode is None)
    model.fast_path = {"dtype": network_dtype(wrapper), "channels_last": channels_last, "compiled": compile,
                       "packed_convolutions": packed}
    return model


def fast_layout(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the layout :func:`prepare_for_inference` chose for ``model`` (unchanged for an unprepared model)."""
    return to_memory_format(x, bool(getattr(model, "fast_path", {}).get("channels_last", False)))


@contextlib.contextmanager
def inference_context() -> Iterator[None]:
    """``torch.inference_mode()``: no autograd bookkeeping (and the mode frozen compiled graphs need)."""
    with torch.inference_mode():
        yield


# ------------------------------------------------------------------------------------------------- conditioning


def unique_conditioning(encode: Callable[[list[str]], Any], prompts: Sequence[str]) -> Any:
    """Run ``encode`` (e.g. ``model.get_learned_conditioning``) once per *distinct* prompt and expand to ``prompts``.

    Works for tensors and (nested) lists/dicts of tensors whose first axis is the prompt; the result equals
    ``encode(list(prompts))`` row for row.
    """
    prompts = list(prompts)
    order: dict[str, int] = {}
    for p in prompts:
        order.setdefault(p, len(order))
    encoded = encode(list(order))
    index = [order[p] for p in prompts]
    return _take_rows(encoded, index)


def _take_rows(value: Any, index: list[int]) -> Any:
    if isinstance(value, torch.Tensor):
        return value[torch.tensor(index, device=value.device)]
    if isinstance(value, dict):
        return {k: _take_rows(v, index) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_take_rows(v, index) for v in value)
    raise TypeError(f"cannot index conditioning of type {type(value).__name__}")


# ---------------------------------------------------------------------------------------------------- decoding


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``[0, size)`` with at least ``overlap`` shared between neighbours."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _ramp(length: int, start: int, stop: int, size: int, fade: int) -> torch.Tensor:
    """1-D blending weights of one tile: 1 inside, linear ramps over ``fade`` where a neighbour tile overlaps."""
    w = torch.ones(length, dtype=torch.float32)
    if fade <= 0:
        return w
    ramp = (torch.arange(fade, dtype=torch.float32) + 0.5) / fade
    if start > 0:
        w[:fade] = torch.minimum(w[:fade], ramp)
    if stop < size:
        w[-fade:] = torch.minimum(w[-fade:], ramp.flip(0))
    return w


def decode_tiled(
    decode: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Decode latents ``z`` ``[b, c, h, w]`` tile by tile and blend the overlaps (linear ramps, weights summing to 1).

    ``decode`` maps a latent tile to an image tile (any integer upscaling factor). Peak memory is that of one
    ``tile`` x ``tile`` decode. With a single tile (``h, w <= tile``) this is exactly ``decode(z)``. Returns float32.
    """
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise UsageError(f"tiling needs tile >= 1 and 0 <= overlap < tile (got tile {tile}, overlap {overlap})")
    _, _, h, w = z.shape
    if h <= tile and w <= tile:
        return decode(z).float()
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    out = weight = None
    scale = 1
    total = len(ys) * len(xs)
    for n, (y0, x0) in enumerate((y, x) for y in ys for x in xs):
        th, tw = min(tile, h - y0), min(tile, w - x0)
        img = decode(z[:, :, y0 : y0 + th, x0 : x0 + tw]).float()
        if out is None:
            scale = img.shape[-1] // tw
            out = torch.zeros(img.shape[0], img.shape[1], h * scale, w * scale, device=img.device)
            weight = torch.zeros(1, 1, h * scale, w * scale, device=img.device)
        fade_y = min(overlap, max(th - 1, 0)) * scale
        fade_x = min(overlap, max(tw - 1, 0)) * scale
        wy = _ramp(th * scale, y0, y0 + th, h, fade_y)
        wx = _ramp(tw * scale, x0, x0 + tw, w, fade_x)
        tile_w = rearrange(wy, "y -> 1 1 y 1") * rearrange(wx, "x -> 1 1 1 x")
        tile_w = tile_w.to(img.device)
        ys_, xs_ = slice(y0 * scale, (y0 + th) * scale), slice(x0 * scale, (x0 + tw) * scale)
        out[:, :, ys_, xs_] += img * tile_w
        weight[:, :, ys_, xs_] += tile_w
        if callback:
            callback(f"decoded tile {n + 1}/{total}")
    return out / weight


def decode_latents(
    model: nn.Module,
    z: torch.Tensor,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    channels_last: bool | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Images in [-1, 1] (float32) from diffusion latents, with the first stage in its own dtype and layout.

    Same arithmetic as ``LatentDiffusion.decode_first_stage`` (divide by ``scale_factor``; a VQ stage quantises the
    whole latent first), the latents cast to the first stage's dtype. ``tile`` (latent pixels) decodes tile by tile
    (:func:`decode_tiled`) for images whose activations would not fit; None decodes in one go. ``overlap`` (latent
    pixels) defaults to ``min(DEFAULT_OVERLAP, tile // 4)``.
    """
    first_stage = _first_stage(model)
    if first_stage is None:
        raise UsageError("decode_latents needs a model with a first stage")
    dtype = network_dtype(first_stage)
    if channels_last is None:
        channels_last = getattr(model, "fast_path", {}).get("channels_last", False)
    z = 1.0 / model.scale_factor * z.float()
    force_not_quantize = False
    from ldmcli.models.autoencoder import VQModelInterface

    if isinstance(first_stage, VQModelInterface):
        z = first_stage.quantize(z.to(dtype))[0]  # per-pixel nearest code: the same with or without tiles
        force_not_quantize = True

    def decode(part: torch.Tensor) -> torch.Tensor:
        part = to_memory_format(part.to(dtype), channels_last)
        if force_not_quantize:
            return first_stage.decode(part, force_not_quantize=True)
        return first_stage.decode(part)

    if tile is None:
        return decode(z).float()
    if overlap is None:
        overlap = min(DEFAULT_OVERLAP, tile // 4)
    return decode_tiled(decode, z, tile=tile, overlap=overlap, callback=callback)
