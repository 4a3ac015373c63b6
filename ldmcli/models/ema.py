"""Exponential moving average of model weights (Polyak averaging), state-dict compatible with upstream ``LitEma``.

Shadow weights are buffers named after each trainable parameter with the dots removed
(``diffusion_model.input_blocks.0.0.weight`` -> ``diffusion_modelinput_blocks00weight``), next to a float32
``decay`` and an int32 ``num_updates`` (-1 when the warm-up rule is off).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class LitEma(nn.Module):
    """EMA shadows of ``model``'s trainable parameters.

    Each call ``ema(model)`` moves the shadows towards the current weights:
    ``s -= (1 - d) * (s - p)`` with ``d = min(decay, (1 + n) / (10 + n))`` while ``use_num_upates`` (upstream's
    spelling) counts updates ``n``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError("decay must be between 0 and 1")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update from ``model``'s current parameters (upstream arithmetic, float32 decay)."""
        decay = self.decay
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = torch.minimum(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        one_minus_decay = 1.0 - decay
        shadows = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            shadow = shadows[self.m_name2s_name[name]]
            shadow.sub_(one_minus_decay.to(shadow.dtype) * (shadow - param.to(shadow.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow weights into ``model``'s trainable parameters."""
        shadows = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.data.copy_(shadows[self.m_name2s_name[name]].data)

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Keep a copy of ``parameters`` to put back with :meth:`restore`."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Copy the parameters saved by :meth:`store` back (in the same order) and drop the saved copy."""
        for saved, param in zip(self.collected_params, parameters):
            param.data.copy_(saved.data)
        self.collected_params = []
