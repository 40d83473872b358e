"""Lookahead of the weights (Zhang et al., 2019, "Lookahead Optimizer: k steps forward, 1 step back").

A slow copy of the model's floating-point state (weights and BatchNorm statistics) follows the
trained ("fast") one: every ``every`` optimizer steps it moves toward the fast weights by
``1 - decay``, and the fast weights restart from it. Fast CIFAR trainers use it with a decay that
grows over the run (here ``decay x progress**3``: early steps run unhindered, the last ones are
averaged) and end on the slow weights. :class:`densenet.optimization.Optimization` drives it (``--lookahead``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Lookahead", "LOOKAHEAD_EVERY"]

LOOKAHEAD_EVERY = 5  # optimizer steps between two updates of the slow weights


class Lookahead:
    """The slow weights of ``model``; :meth:`step` after each optimizer step, :meth:`finish` at the end."""

    def __init__(self, model: nn.Module, decay: float, every: int = LOOKAHEAD_EVERY) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"the lookahead decay must be in (0, 1), got {decay}")
        self.decay, self.every = float(decay), int(every)
        self.slow = {name: value.detach().clone() for name, value in self._floats(model).items()}

    @staticmethod
    def _floats(model: nn.Module) -> dict[str, torch.Tensor]:
        return {name: value for name, value in model.state_dict().items() if value.is_floating_point()}

    @torch.no_grad()
    def _pull(self, model: nn.Module, decay: float) -> None:
        """slow <- decay x slow + (1 - decay) x fast; fast <- slow."""
        for name, fast in self._floats(model).items():
            slow = self.slow[name]
            slow.lerp_(fast, 1.0 - decay)
            fast.copy_(slow)

    def step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """After optimizer step ``step`` (counted from 1) of ``total_steps``: every ``every`` steps, the
        slow weights take ``1 - decay x (step / total_steps)**3`` of the fast ones and the fast restart
        from them; the run's last step ends on the slow weights (:meth:`finish`)."""
        if step >= total_steps:
            self.finish(model)
        elif step % self.every == 0:
            self._pull(model, self.decay * (step / total_steps) ** 3)

    def finish(self, model: nn.Module) -> None:
        """Give ``model`` the slow weights (the fast steps since the last update are dropped)."""
        self._pull(model, 1.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.slow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.slow):
            raise ValueError("the lookahead weights do not match the model's")
        for name, value in state.items():
            self.slow[name].copy_(value)
