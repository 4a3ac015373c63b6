"""torch-fidelity, the library behind ``ldm eval``: its Inception (the PyTorch port of the TF FID network that the
papers used) and its metric functions (Frechet distance, Inception Score, KID, precision/recall). Nothing here
re-implements either; this module only finds the library, hands it the weights from our store, and calls it.

The Inception weights are the zoo asset ``inception`` (torch-fidelity's own release file, verified by its sha256
prefix), fetched through :mod:`ldmcli.store` and handed to torch-fidelity by path, so it never downloads anything
itself. Before torch-fidelity reads the file (it unpickles it), we read it once with ``weights_only=True``: a corrupt
or foreign file is a one-line error here, and no pickled code ever runs.

An explicit weight file (``path=``, e.g. one converted from another port of the same TF graph) may lack the logits
layer (``fc``): the network then yields the 2048-d pool features only (FID, KID, precision/recall) and no logits, so
no Inception Score is computed from it -- nothing stands in for the missing layer.

torchvision: torch-fidelity imports it at package import, but the Inception extractor and the metric functions
never use it (only its CIFAR/STL datasets and its CLIP/DINOv2/VGG extractors do). Where torchvision is not
installed (a CPU-only torch from the PyTorch CPU index has no torchvision on PyPI that loads with it: PyPI's is a
CUDA build whose compiled ops fail to load and which then breaks lightning and torchmetrics too), torch-fidelity is
imported with every ``torchvision`` name bound to a placeholder that raises :class:`EvalDependencyError` when it is
used; the placeholders are removed from ``sys.modules`` right after, so no other library sees them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldmcli.errors import CheckpointError, LdmError

ASSET = "inception"
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
#: the features ldm eval uses: the 2048-d pool features (FID, KID, precision/recall) and the logits (IS)
POOL, LOGITS = "2048", "logits_unbiased"
FEATURES = (POOL, LOGITS)
LOGITS_LAYER = ("fc.weight", "fc.bias")
INSTALL_HINT = "pip install --no-deps 'torch-fidelity==0.4.0' (or pip install 'ldmcli[eval]' where torchvision " \
               "matches your torch)"


class EvalDependencyError(LdmError):
    """torch-fidelity (or a part of torchvision it needs) is not installed."""


# ------------------------------------------------------------------------------------------- importing the library


class _TorchvisionPlaceholder(types.ModuleType):
    """Stands in for ``torchvision`` (and its submodules) while torch-fidelity is imported without it: every
    attribute is a class whose construction raises, so subclassing at import works and any real use fails loudly."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        qualname = f"{self.__name__}.{name}"

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise EvalDependencyError(f"{qualname} needs torchvision, which is not installed")

        return type(name, (), {"__new__": refuse, "__init__": refuse})


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        return _TorchvisionPlaceholder(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []  # type: ignore[attr-defined]


def _torchvision_installed() -> bool:
    return importlib.util.find_spec("torchvision") is not None


_LIB: dict[str, Any] = {}


def library() -> dict[str, Any]:
    """torch-fidelity's pieces ldm eval uses, by name: ``FeatureExtractorInceptionV3``, ``fid_features_to_statistics``,
    ``fid_statistics_to_metric``, ``isc_features_to_metric``, ``kid_features_to_metric``, ``prc_features_to_metric``
    and the metric key constants. Raises :class:`EvalDependencyError` (one line, with the install command)."""
    if _LIB:
        return _LIB
    if importlib.util.find_spec("torch_fidelity") is None:
        raise EvalDependencyError(f"ldm eval needs torch-fidelity: {INSTALL_HINT}")
    finder = None
    if not _torchvision_installed():
        finder = _PlaceholderFinder()
        sys.meta_path.insert(0, finder)
    try:
        import torch_fidelity
        from torch_fidelity import metric_fid, metric_isc, metric_kid, metric_prc
    except RuntimeError as e:  # an installed torchvision whose compiled ops do not match torch
        raise EvalDependencyError(f"torchvision does not load with this torch ({e}): uninstall it and "
                                  f"{INSTALL_HINT}") from None
    finally:
        if finder is not None:
            sys.meta_path.remove(finder)
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                if isinstance(sys.modules[name], _TorchvisionPlaceholder):
                    del sys.modules[name]
    _LIB.update(
        version=torch_fidelity.__version__,
        FeatureExtractorInceptionV3=torch_fidelity.FeatureExtractorInceptionV3,
        fid_features_to_statistics=metric_fid.fid_features_to_statistics,
        fid_statistics_to_metric=metric_fid.fid_statistics_to_metric,
        isc_features_to_metric=metric_isc.isc_features_to_metric,
        kid_features_to_metric=metric_kid.kid_features_to_metric,
        prc_features_to_metric=metric_prc.prc_features_to_metric,
        KEY_FID=metric_fid.KEY_METRIC_FID,
        KEY_IS_MEAN=metric_isc.KEY_METRIC_ISC_MEAN,
        KEY_IS_STD=metric_isc.KEY_METRIC_ISC_STD,
        KEY_KID_MEAN=metric_kid.KEY_METRIC_KID_MEAN,
        KEY_KID_STD=metric_kid.KEY_METRIC_KID_STD,
        KEY_PRECISION=metric_prc.KEY_METRIC_PRECISION,
        KEY_RECALL=metric_prc.KEY_METRIC_RECALL,
    )
    return _LIB


# ------------------------------------------------------------------------------------------------------ the network


def weights_path(progress: Any = None) -> Path:
    """The Inception weight file from the store (downloaded on first use; ``--offline`` errors name
    ``ldm download inception``)."""
    from ldmcli import store

    return store.asset_path(ASSET, progress=progress) / WEIGHTS_FILE


def _fix(from_store: bool) -> str:
    if from_store:
        return f"run 'ldm download {ASSET} --force' to fetch it again"
    return f"give torch-fidelity's Inception weight file ('ldm download {ASSET}' fetches it)"


def check_weights(path: Path, from_store: bool = True) -> bool:
    """Read the file without running pickled code; a corrupt or foreign file is a one-line error. Returns whether it
    holds the logits layer (``fc``, for the Inception Score)."""
    fix = _fix(from_store)
    if not path.is_file():
        raise CheckpointError(f"Inception weights missing: {path}; " +
                              (f"run 'ldm download {ASSET}'" if from_store else fix))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 (truncated zip, not a torch file, a pickle of arbitrary objects)
        raise CheckpointError(f"cannot read the Inception weights {path} ({type(e).__name__}): {fix}") from None
    if not isinstance(state, dict) or "Conv2d_1a_3x3.conv.weight" not in state:
        raise CheckpointError(f"{path} is not torch-fidelity's Inception state dict: {fix}")
    logits = [k in state for k in LOGITS_LAYER]
    if any(logits) and not all(logits):
        raise CheckpointError(f"{path} holds half of the logits layer ({', '.join(LOGITS_LAYER)}): {fix}")
    return all(logits)


def _pool_only_class(base: type) -> type:
    """torch-fidelity's Inception for a state dict without the logits layer: every other tensor is loaded strictly
    and ``fc`` is removed, so nothing can compute logits from its untrained initial weights."""

    class InceptionPoolFeatures(base):  # type: ignore[misc, valid-type]
        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
            result = super().load_state_dict(state_dict, strict=False, assign=assign)
            missing = [k for k in result.missing_keys if k not in LOGITS_LAYER]
            if missing or result.unexpected_keys:
                raise RuntimeError(f"missing keys {missing[:3]}, unexpected keys {result.unexpected_keys[:3]}")
            del self.fc
            return result

    return InceptionPoolFeatures


def load_inception(device: torch.device | str = "cpu", progress: Any = None,
                   path: str | os.PathLike | None = None, *, from_store: bool | None = None) -> torch.nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` with the store's weights (or ``path``), producing
    :data:`FEATURES` for uint8 ``[n, 3, h, w]`` batches (it resizes to 299x299 as TF did); only the pool features
    (:data:`POOL`) when the file has no logits layer (see :func:`has_logits`). ``from_store`` (default: ``path`` is
    None) picks the advice of the error messages."""
    lib = library()
    from_store = path is None if from_store is None else from_store
    path = Path(path) if path is not None else weights_path(progress)
    stat = path.stat() if path.is_file() else None
    key = (str(path.resolve()), stat.st_size if stat else -1, stat.st_mtime_ns if stat else -1, str(device))
    if key in _NETS:
        return _NETS[key]
    with_logits = check_weights(path, from_store)
    cls = lib["FeatureExtractorInceptionV3"]
    try:
        if with_logits:
            net = cls("inception-v3-compat", list(FEATURES), feature_extractor_weights_path=str(path))
        else:
            net = _pool_only_class(cls)("inception-v3-compat", [POOL], feature_extractor_weights_path=str(path))
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} does not fit torch-fidelity's Inception ({str(e).splitlines()[0]}): "
                              f"{_fix(from_store)}") from None
    _NETS.clear()  # one network at a time (95 MB)
    _NETS[key] = net.to(device)
    return _NETS[key]


def has_logits(net: torch.nn.Module) -> bool:
    """Whether ``net`` (from :func:`load_inception`) yields logits, i.e. can give an Inception Score."""
    return LOGITS in net.features_list


#: the last network loaded, by (file, size, mtime, device): a sweep measures every setting with one network
_NETS: dict[tuple[str, int, int, str], torch.nn.Module] = {}


@torch.no_grad()
def inception_features(net: torch.nn.Module, images: np.ndarray) -> dict[str, torch.Tensor]:
    """``[n, h, w, 3]`` uint8 images → ``{"2048": [n, 2048], "logits_unbiased": [n, 1008]}`` float32 on the CPU
    (no ``logits_unbiased`` from a network without the logits layer)."""
    device = next(net.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(device)
    out = net(x)
    return {name: t.detach().float().cpu() for name, t in zip(net.features_list, out)}


# ---------------------------------------------------------------------------------------------------- the metrics


def fid_statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """torch-fidelity's mean and covariance of ``[n, 2048]`` features (float64 ``mu``, ``sigma``)."""
    stats = library()["fid_features_to_statistics"](features.double())
    return {"mu": np.asarray(stats["mu"], dtype=np.float64), "sigma": np.asarray(stats["sigma"], dtype=np.float64)}


def fid(stats_1: dict[str, np.ndarray], stats_2: dict[str, np.ndarray]) -> float:
    """The Frechet distance of two ``{"mu", "sigma"}`` statistics (torch-fidelity's function)."""
    lib = library()
    s1 = {k: np.asarray(stats_1[k], dtype=np.float64) for k in ("mu", "sigma")}
    s2 = {k: np.asarray(stats_2[k], dtype=np.float64) for k in ("mu", "sigma")}
    if s1["mu"].shape != s2["mu"].shape:
        raise ValueError(f"statistics of different sizes: {s1['mu'].shape} and {s2['mu'].shape}")
    return float(lib["fid_statistics_to_metric"](s1, s2, False)[lib["KEY_FID"]])


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) of ``[n, 1008]`` logits; fewer splits when n < splits."""
    lib = library()
    out = lib["isc_features_to_metric"](logits, splits=max(1, min(splits, len(logits))))
    return float(out[lib["KEY_IS_MEAN"]]), float(out[lib["KEY_IS_STD"]])


def kid(features_1: torch.Tensor, features_2: torch.Tensor, subsets: int = 100,
        subset_size: int = 1000, seed: int = 2020) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std), subsets of ``min(subset_size, n1, n2)`` as torch-fidelity computes it."""
    lib = library()
    size = min(subset_size, len(features_1), len(features_2))
    out = lib["kid_features_to_metric"](features_1, features_2, kid_subsets=subsets, kid_subset_size=size,
                                        rng_seed=seed, verbose=False)
    return float(out[lib["KEY_KID_MEAN"]]), float(out[lib["KEY_KID_STD"]])


def precision_recall(generated: torch.Tensor, real: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, k nearest neighbours) of generated vs real features."""
    lib = library()
    out = lib["prc_features_to_metric"](generated, real, prc_neighborhood=k, prc_batch_size=10000,
                                        save_cpu_ram=False, verbose=False)
    return float(out[lib["KEY_PRECISION"]]), float(out[lib["KEY_RECALL"]])
