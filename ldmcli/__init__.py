"""ldmcli: latent diffusion models (Rombach et al., 2022) and retrieval-augmented diffusion (Blattmann et al., 2022).

The Python API keeps upstream's names so notebooks port over::

    from ldmcli import load_model, DDIMSampler, PLMSSampler
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("ldmcli.loading", "load_model"),
    "DDIMSampler": ("ldmcli.sampling.compat", "DDIMSampler"),
    "PLMSSampler": ("ldmcli.sampling.compat", "PLMSSampler"),
    "layout_tokens": ("ldmcli.conditioning.layout", "layout_tokens"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    # Lazy so that `ldm --help` and `ldm download` never pay for importing torch.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ldmcli' has no attribute {name!r}")
