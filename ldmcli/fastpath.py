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

import bisect
import contextlib
import ctypes
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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
    """True when every 4-D weight of ``module`` (its convolutions) is stored channels_last (a convolution whose weight
    lives only packed counts as the layout it was packed from)."""
    layouts = []
    for m in module.modules():
        if isinstance(m, PackedConv2d) and m.dense_released:
            layouts.append(m.__dict__["_ldm_dense_format"] == "channels_last" or m.kernel_size == (1, 1))
            continue
        for p in m.parameters(recurse=False):
            if p.dim() == 4 and p.shape[2] * p.shape[3] > 1:
                layouts.append(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous())
    return bool(layouts) and all(layouts)


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


def _weight_key(w: torch.Tensor) -> tuple:
    """What identifies a weight's values for the packed cache: storage, dtype, shape and in-place version."""
    try:
        version = w._version
    except RuntimeError:  # inference tensors have no version counter (and cannot change outside inference mode)
        version = -1
    return (w.data_ptr(), w.dtype, tuple(w.shape), version)


#: oneDNN's weight reorder that reads a dense tensor (what inductor's packing uses); None in builds without it.
#: Measured on a 1280x2560x3x3 float32 weight: 0.07 s against 0.21-0.31 s for to_mkldnn() then the reorder, the
#: same bytes out.
_REORDER_DENSE = getattr(getattr(torch.ops, "mkldnn", None), "_reorder_convolution_weight", None) \
    if torch.backends.mkldnn.is_available() else None


class PackedConv2d(nn.Conv2d):
    """``nn.Conv2d`` that, at CPU inference, runs oneDNN on a weight reordered once into oneDNN's blocked layout.

    Eager PyTorch reorders every convolution's weight on every call; for the UNet's low-resolution levels (a
    1280x2560x3x3 kernel over 4x4 pixels) that costs more than the arithmetic. Packing once is what inductor's
    ``freezing`` does; here it happens in eager mode. Same oneDNN kernel, same result (bit-identical in the tests).

    The weight is packed for the exact input shape it is called with: oneDNN picks its kernel, and the blocked weight
    format that kernel wants, from the shapes given at packing time, and a weight packed for other shapes makes it
    fall back to a slow kernel for some of them (measured, 1 thread: a 2048->1280 3x3 convolution over 4x4 pixels
    packed for 16x16 inputs took 1.30 s a call on AVX2 against 20 ms packed for 4x4; a 1x1 2560->1280 packed for 8x8
    took 150-200 ms at 4x4 against 1-3 ms, on AVX-512 too). A call with new channels or pixels packs again (from the
    dense weight, or from the packed one when that is the only copy); a sampling loop calls each convolution with
    one shape, so that happens once. Another batch size alone does not repack (it changed little in the same
    measurements), so a last, smaller batch of patches or images does not repack twice per step.

    Two ways to hold the weight:

    * beside the parameter (:func:`pack_convolutions` default; the packed copy is a cache, rebuilt when the weight
      or the input shape changes): two copies of every convolution weight;
    * *instead of* it (``release_dense=True``, what :func:`prepare_for_inference` does): from the first packing on,
      the packed copy is the only one. ``self.weight`` is then a zero-byte NaN placeholder of the right shape, dtype
      and device (anything that computes with it directly gets NaN, never plausible numbers); ``state_dict()``,
      ``copy.deepcopy``/pickle, ``.to()``/``.cuda()`` and the ordinary path (training, other devices or dtypes)
      restore the real dense weight from the packed one first (:meth:`restore_dense`), exactly.

    Training, other devices and dtypes, and non-zero padding modes take the ordinary path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed(x)
        if packed is None:
            self.restore_dense()
            return super().forward(x)
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups, "none", [],
            "",
        )

    # ---- the packed copy

    def _packable(self, x: torch.Tensor | None) -> bool:
        w = self.weight
        if x is not None and (x.device.type != "cpu" or x.dim() != 4 or x.dtype != w.dtype):
            return False
        return (
            w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16)
            and self.padding_mode == "zeros" and not isinstance(self.padding, str)
            and not (torch.is_grad_enabled() and (w.requires_grad or (x is not None and x.requires_grad)))
        )

    def _reorder(self, weight: torch.Tensor, input_size: list[int]) -> torch.Tensor | None:
        args = (list(self.padding), list(self.stride), list(self.dilation), self.groups, input_size)
        try:
            if _REORDER_DENSE is not None:  # straight from the dense weight: 3x faster than through to_mkldnn()
                return _REORDER_DENSE(weight.detach(), *args)
            return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.detach().to_mkldnn(), *args)
        except (RuntimeError, NotImplementedError):  # a configuration oneDNN cannot pack: stay eager
            return None

    def _packed(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self._packable(x):
            return None
        shape = tuple(x.shape)
        cache = self.__dict__.get("_ldm_packed")
        if self.dense_released:
            if cache[0][1:] != shape[1:]:  # the only copy is packed for other inputs: pack it again for these
                packed = self._reorder(self.dense_weight(), list(shape))
                if packed is None:
                    return cache[1]
                cache = (shape, packed)
                self.__dict__["_ldm_packed"] = cache
            return cache[1]
        w = self.weight
        key = (_weight_key(w), shape)
        if cache is None or cache[0][0] != key[0] or cache[0][1][1:] != shape[1:]:
            packed = self._reorder(w, list(shape))
            if packed is not None and self.__dict__.get("_ldm_release_on_pack"):
                self._release_dense(packed, shape)
                return packed
            cache = (key, packed)
            self.__dict__["_ldm_packed"] = cache
        return cache[1]

    @property
    def dense_released(self) -> bool:
        """True while the packed copy is the only copy of the weight (``self.weight`` a placeholder)."""
        return bool(self.__dict__.get("_ldm_dense_format"))

    def pack_now(self, input_size: list[int] | None = None, *, release_dense: bool = False) -> bool:
        """Pack the weight now for inputs of ``input_size`` (default: one image of 16x16 output pixels; a call with
        other shapes packs again for them) and, with ``release_dense``, drop the dense weight. False (nothing done)
        where the ordinary path would be taken anyway."""
        if self.dense_released:
            return True
        if not self._packable(None):
            return False
        w = self.weight
        size = list(input_size or [1, self.in_channels, 16 * self.stride[0], 16 * self.stride[1]])
        packed = self._reorder(w, size)
        if packed is None:
            return False
        if release_dense:
            self._release_dense(packed, tuple(size))
        else:
            self.__dict__["_ldm_packed"] = ((_weight_key(w), tuple(size)), packed)
        return True

    def release_on_pack(self) -> None:
        """Keep only the packed copy from the first packing on (the first call packs for its own input shape)."""
        self.__dict__["_ldm_release_on_pack"] = True

    def _release_dense(self, packed: torch.Tensor, shape: tuple) -> None:
        w = self.weight
        channels_last = w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        self.__dict__["_ldm_packed"] = (shape, packed)
        self.__dict__["_ldm_dense_format"] = "channels_last" if channels_last else "contiguous"
        self.__dict__.pop("_ldm_release_on_pack", None)
        with torch.inference_mode(False):  # packing happens in the first (inference mode) call: a normal tensor
            placeholder = torch.full((), float("nan"), dtype=w.dtype, device=w.device).expand(w.shape)
            self.weight = nn.Parameter(placeholder, requires_grad=False)
        _trim_heap_every(w.numel() * w.element_size())

    def dense_weight(self) -> torch.Tensor:
        """The real weight (a new tensor when it lives only packed), in the layout it had."""
        if not self.dense_released:
            return self.weight
        dense = self.__dict__["_ldm_packed"][1].to_dense()
        if self.__dict__["_ldm_dense_format"] == "channels_last":
            dense = dense.contiguous(memory_format=torch.channels_last)
        return dense

    def restore_dense(self) -> None:
        """Make ``self.weight`` the real dense weight again (the packed copy is dropped)."""
        if not self.dense_released:
            return
        dense = self.dense_weight()
        requires_grad = self.weight.requires_grad
        self.__dict__.pop("_ldm_dense_format", None)
        self.__dict__.pop("_ldm_packed", None)
        self.__dict__.pop("_ldm_release_on_pack", None)
        self.weight = nn.Parameter(dense, requires_grad=requires_grad)

    # ---- everything that reads the weight's values gets the real one

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .float(), ...
        self.restore_dense()
        self.__dict__.pop("_ldm_packed", None)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.dense_released:
            destination[prefix + "weight"] = self.dense_weight()

    def _load_from_state_dict(self, *args, **kwargs):
        self.restore_dense()
        self.__dict__.pop("_ldm_packed", None)
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        if self.dense_released:
            params = dict(state["_parameters"])
            params["weight"] = nn.Parameter(self.dense_weight(), requires_grad=False)
            state["_parameters"] = params
        state.pop("_ldm_packed", None)  # an opaque oneDNN tensor: rebuilt on the next call
        state.pop("_ldm_dense_format", None)
        return state


def pack_convolutions(module: nn.Module, *, release_dense: bool = False) -> int:
    """Make every plain ``nn.Conv2d`` in ``module`` a :class:`PackedConv2d` (in place); returns how many.

    The class is swapped on the existing objects, so names, parameters and state_dict keys stay as they are. Each
    convolution packs on its first call, for that call's input shape, and then holds its weight twice (the
    parameter and the packed copy); ``release_dense`` keeps only the packed copy from the first packing on (see
    :class:`PackedConv2d`). :meth:`PackedConv2d.pack_now` packs one at once.
    """
    if not mkldnn_available():
        return 0
    count = 0
    for m in module.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = PackedConv2d
            count += 1
        if release_dense and type(m) is PackedConv2d:
            m.release_on_pack()
    return count


def unpack_convolutions(module: nn.Module) -> None:
    """Undo :func:`pack_convolutions` (plain ``nn.Conv2d`` again with its dense weight, packed copies dropped)."""
    for m in module.modules():
        if type(m) is PackedConv2d:
            m.restore_dense()
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


# ------------------------------------------------------------------------------------------ a model's networks


def _first_stage(model: nn.Module) -> nn.Module | None:
    fs = getattr(model, "first_stage_model", None)
    return fs if isinstance(fs, nn.Module) else None


def _unet_wrapper(model: nn.Module) -> nn.Module:
    wrapper = getattr(model, "model", None)
    if not isinstance(wrapper, nn.Module):
        raise UsageError("prepare_for_inference expects a LatentDiffusion model (with .model and .first_stage_model)")
    return wrapper


# ------------------------------------------------------------------------------------------- per-stage choices


@dataclass(frozen=True)
class StagePlan:
    """How one network runs on the fast path: its memory format and whether its convolutions are packed."""

    channels_last: bool
    pack: bool


#: Measured choices per CPU kind (``ldmcli.devices.CpuKind.key``) and precision, for the UNet and the first stage;
#: kinds not listed take ``_CPU_FLOAT32`` in float32, else ``_CPU_DEFAULT``: channels_last with every convolution packed (1x1 included) for the input
#: shape it is called with. UNet step of txt2img-f8-large at 256x256, batch 2, 1 thread, CPU time against the plain
#: contiguous unpacked UNet, alternated in one process (channels_last + packed, 1x1 left eager / packed too):
#: AVX512-BF16 fp32 0.72 / 0.70, bf16 0.87 / 0.81; emulated AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)
#: fp32 0.77 / 0.73. (Packing every weight for one fixed 16x16 input instead made oneDNN fall back to a slow kernel
#: for some shapes on AVX2 -- a 2048->1280 3x3 convolution at 4x4 took 1.30 s a call against 20 ms -- and made the
#: whole UNet 2.2-2.6x slower than plain there; packing for the call's own shape fixed it.) The decoder in float32
#: stays plain on every kind: channels_last + packed, it decoded one 256x256 image in 0.91-1.13x the plain decoder's
#: time across six ``txt2img_e2e.py`` runs (AVX512-BF16 and emulated AVX2, packing included), and issue 18's real
#: AVX2 machine measured the fast decoder slower (6.7-7.1 s against 4.5-4.6 s); in bf16 it decodes in 0.45-0.58x.
_CPU_PLANS: dict[tuple[str, str], dict[str, StagePlan]] = {}
#: float32 on any CPU kind not in ``_CPU_PLANS``
_CPU_FLOAT32 = {"unet": StagePlan(True, True), "first_stage": StagePlan(False, False)}
_CPU_DEFAULT = {"unet": StagePlan(True, True), "first_stage": StagePlan(True, True)}
_OTHER_DEVICE = {"unet": StagePlan(False, False), "first_stage": StagePlan(False, False)}


def choose_plan(device: str | torch.device | None, dtype: torch.dtype | None = None,
                kind: Any = None) -> dict[str, StagePlan]:
    """The fast path's layout and packing for the UNet (``"unet"``) and the first stage (``"first_stage"``) on
    ``device`` in ``dtype``: per CPU kind from measurements on the CPU (``kind``: a
    :class:`ldmcli.devices.CpuKind`, default this machine's); contiguous and unpacked on GPUs (see the module doc)."""
    where = torch.device(device if device is not None else "cpu")
    if where.type != "cpu":
        return dict(_OTHER_DEVICE)
    if kind is None:
        from ldmcli.devices import cpu_kind

        kind = cpu_kind()
    name = str(dtype if dtype is not None else torch.float32).removeprefix("torch.")
    plan = dict(_CPU_PLANS.get((kind.key, name), _CPU_FLOAT32 if name == "float32" else _CPU_DEFAULT))
    if not mkldnn_available():
        plan = {k: StagePlan(v.channels_last, False) for k, v in plan.items()}
    return plan


# ------------------------------------------------------------------------------- one copy of the weights (CPU)


_PAGE = 4096
_MADV_DONTNEED = 4  # Linux


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed memory maps (a checkpoint loaded with mmap), sorted; empty where
    ``/proc/self/maps`` does not exist (then nothing is released early; the map goes when its last view does)."""
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    ranges = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and fields[4] != "0":
            lo, hi = fields[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return sorted(ranges)


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[start, stop) bytes of the memory ``t`` views."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def _in_file_map(t: torch.Tensor, maps: list[tuple[int, int]]) -> bool:
    if t.device.type != "cpu" or not maps or t.numel() == 0:
        return False
    start, stop = _extent(t)
    i = bisect.bisect_right(maps, (start, float("inf"))) - 1
    return i >= 0 and maps[i][0] <= start and stop <= maps[i][1]


def _release_pages(t: torch.Tensor) -> None:
    """Drop this process's resident pages that lie wholly inside ``t`` (a view of a private file map whose data has
    been copied): they stop counting in RSS, and would be read again from the file if touched."""
    start, stop = _extent(t)
    lo, hi = -(-start // _PAGE) * _PAGE, stop // _PAGE * _PAGE
    if hi <= lo:
        return
    madvise = _madvise()
    if madvise is not None:  # without madvise the map is released when its last view goes
        madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def _trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc ``malloc_trim``). Copying and packing thousands of
    weights leaves freed chunks below glibc's mmap threshold in the heap, resident: 0.8 GB of a float32
    txt2img-f8-large (13% of its weights) without this. Elsewhere (no glibc) nothing happens."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(ctypes.c_size_t(0))


_TRIM_EVERY = 64 * 2**20
_since_trim = 0


def _trim_heap_every(nbytes: int) -> None:
    """:func:`_trim_heap` once per ``_TRIM_EVERY`` bytes copied, so freed chunks never pile up while converting."""
    global _since_trim
    _since_trim += nbytes
    if _since_trim >= _TRIM_EVERY:
        _since_trim = 0
        _trim_heap()


@functools.lru_cache(maxsize=None)
def _libc_function(name: str) -> Any:
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


def _madvise() -> Any:
    return _libc_function("madvise")


def _convert_tensors(
    modules: Sequence[nn.Module], *, device: torch.device | None, dtype: torch.dtype | None,
    memory_format: torch.memory_format | None, maps: list[tuple[int, int]], memo: dict, skip: set[int],
) -> None:
    """Cast/move/re-lay-out every parameter and buffer of ``modules`` (as ``Module.to`` would: dtype for floating
    tensors, memory format for 4-D ones) one tensor at a time, so at most one tensor is held twice. A tensor that is a
    view of a checkpoint's file map is always copied into the process's own memory and its pages dropped (one copy
    of the weights, and no file-backed pages the kernel may evict and read back during sampling). Tensors shared
    between modules (aliases) stay shared. ``skip``: ids of modules already converted."""
    for root in modules:
        for m in root.modules():
            if id(m) in skip:
                continue
            skip.add(id(m))
            for table in (m._parameters, m._buffers):
                for key, t in list(table.items()):
                    if t is None:
                        continue
                    ident = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t.device)
                    new = memo.get(ident)
                    if new is None:
                        mapped = _in_file_map(t, maps)
                        cast = dtype if dtype is not None and t.is_floating_point() else None
                        fmt = memory_format if memory_format is not None and t.dim() == 4 else torch.preserve_format
                        new = t.detach().to(device=device, dtype=cast, memory_format=fmt)
                        if mapped and new.device.type == "cpu" and new.data_ptr() == t.data_ptr():
                            new = new.clone(memory_format=torch.preserve_format)
                        if mapped:
                            _release_pages(t)
                        memo[ident] = new
                        if new.data_ptr() != t.data_ptr():
                            _trim_heap_every(t.numel() * t.element_size())
                    if isinstance(t, nn.Parameter):
                        t.data = new
                    else:
                        table[key] = new


# ----------------------------------------------------------------------------------------------------- prepare


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
    plan: dict[str, StagePlan] | None = None,
) -> nn.Module:
    """Ready a loaded ``LatentDiffusion`` for fast sampling, in place, and return it.

    ``dtype`` (None: keep): the UNet's and the first stage's weights. ``conditioner_dtype`` (None: same as
    ``dtype``): the conditioner's (one that *is* the first stage follows the first stage). The LDM's schedule buffers
    stay float32. Layout and packing per network come from ``plan`` (default :func:`choose_plan`: measured per CPU
    kind and precision; contiguous and unpacked on GPUs); ``channels_last`` and ``pack`` (bools) override it for
    both networks. Feed the UNet inputs with :func:`fast_layout` (``model.fast_path`` records the choices).
    ``compile`` compiles the UNet with frozen weights (see :func:`compile_module`; nothing is packed eagerly then); the
    first call then takes minutes on a CPU, later runs reuse the cache.

    Memory: every weight ends up in exactly one copy. Tensors still mapped from the checkpoint file are copied into
    the process's memory one at a time and their pages dropped as they go (so a float32 model does not hold the
    map *and* re-laid-out copies); a packed convolution packs its weight on its first call, for that call's input
    shape, and keeps only the packed copy from then on (:class:`PackedConv2d`).
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
    stages = dict(plan) if plan is not None else choose_plan(where, dtype)
    for name in ("unet", "first_stage"):
        st = stages.get(name, _CPU_DEFAULT[name] if where.type == "cpu" else _OTHER_DEVICE[name])
        stages[name] = StagePlan(st.channels_last if channels_last is None else channels_last,
                                 (st.pack if pack is None else pack) and where.type == "cpu" and not compile)

    if callback:
        what = f"{str(dtype).removeprefix('torch.')} weights" if dtype is not None else "weights as loaded"
        layout = "channels_last" if stages["unet"].channels_last else "contiguous"
        callback(f"preparing for inference: {what}, {layout}")
    for net in (wrapper, first_stage):  # a previous prepare's packed weights: dense again before converting
        if net is not None:
            unpack_convolutions(net)
    maps = _file_mappings()
    memo: dict = {}
    done: set[int] = set()
    networks = [("unet", wrapper)] + ([("first_stage", first_stage)] if first_stage is not None else [])
    for name, net in networks:
        _convert_tensors([net], device=target, dtype=dtype, memory_format=_memory_format(stages[name].channels_last),
                         maps=maps, memo=memo, skip=done)
    if isinstance(cond, nn.Module) and cond is not first_stage:
        _convert_tensors([cond], device=target, dtype=conditioner_dtype if conditioner_dtype is not None else dtype,
                         memory_format=None, maps=maps, memo=memo, skip=done)
    # everything else (schedule buffers, scale_factor, ...): moved, never cast, copied out of the file map
    _convert_tensors([model], device=target, dtype=None, memory_format=None, maps=maps, memo=memo, skip=done)
    memo.clear()
    packed = 0
    for name, net in networks:  # each convolution packs on its first call, for its input shape, keeping one copy
        if stages[name].pack:
            packed += pack_convolutions(net, release_dense=True)
    _trim_heap()
    if compile:
        unet = getattr(wrapper, "diffusion_model", wrapper)
        if callback:
            callback(f"compiling the UNet (cache: {compile_cache_dir()}); the first step takes a while")
        compile_module(unet, mode=compile_mode, freeze=compile_mode is None)
    model.fast_path = {"dtype": network_dtype(wrapper), "channels_last": stages["unet"].channels_last,
                       "first_stage_channels_last": stages["first_stage"].channels_last, "compiled": compile,
                       "packed_convolutions": packed, "plan": stages}
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
    if z.device.type == "cpu":  # the sampling loop's freed activations, kept by the C heap: not under the decoder's
        _trim_heap()
    dtype = network_dtype(first_stage)
    if channels_last is None:
        fp = getattr(model, "fast_path", {})
        channels_last = fp.get("first_stage_channels_last", fp.get("channels_last", False))
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
