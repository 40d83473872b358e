"""Muon for convolution filters (``--optimizer muon``).

Muon (Jordan et al., 2024) replaces a weight matrix's momentum-averaged gradient by its nearest
semi-orthogonal matrix (a few Newton-Schulz iterations) before the step, so that every direction of
the update moves by the same amount; the fast CIFAR-10 trainers' records use it for their
convolution filters and plain SGD for everything else. ``torch.optim.Muon`` takes 2-D parameters
only: :class:`FilterMuon` hands it each out x in x kh x kw filter bank as the out x (in*kh*kw)
matrix of its flattened filters, a view that shares the filters' storage (in the channels-last
layout the columns are ordered kh, kw, in instead, which changes nothing: the orthogonalised matrix
of a column permutation is the same permutation of the orthogonalised matrix).

Every filter of these networks feeds a BatchNorm before anything else reads it (DenseNet's
BN-ReLU-convolution layers, the stems' BatchNorm), so a filter's length does not change what the
network computes. As the fast trainers do, the filters are kept at unit length: each is rescaled
after every step, the learning rate is then the angle a filter turns by per step, and weight decay
has nothing to do for them (it stays on the SGD side's parameters).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FilterMuon", "filter_parameters"]

_TINY = 1e-12  # floor of a filter's length before rescaling (an all-zero filter stays zero)


def filter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable convolution filter banks of ``model`` (4-D weights), in ``parameters()`` order."""
    return [p for p in model.parameters() if p.ndim == 4 and p.requires_grad]


def _as_matrix(tensor: Tensor, channels_last: bool) -> Tensor:
    """``tensor`` (out x in x kh x kw) as an out x (in*kh*kw) matrix, ordered by its memory layout:
    a view where the layout allows one, else a copy (a gradient in another layout)."""
    if channels_last:
        tensor = tensor.permute(0, 2, 3, 1)
    return tensor.reshape(tensor.shape[0], -1)


def _matrix_view(filters: Tensor) -> tuple[Tensor, bool]:
    """A detached 2-D view of ``filters`` sharing its storage, and whether it is channels-last."""
    if filters.is_contiguous():
        return filters.detach().view(filters.shape[0], -1), False
    if filters.is_contiguous(memory_format=torch.channels_last):
        return filters.detach().permute(0, 2, 3, 1).view(filters.shape[0], -1), True
    raise ValueError(f"filters of shape {tuple(filters.shape)} are neither contiguous nor channels-last")


class FilterMuon(torch.optim.Muon):
    """``torch.optim.Muon`` over 4-D convolution filters, kept at unit length (no weight decay).

    ``filters``: the filter banks (:func:`filter_parameters`); ``lr``: the angle a filter turns by
    per step at a learning-rate factor of 1 (a scheduler scales it as any optimizer's);
    ``momentum``/``nesterov``: Muon's. The update of an out x n matrix is scaled by
    sqrt(max(1, out/n)) (Muon's original adjustment), so every filter's step has about the same length.
    The filters must keep their storage and layout (move the model before building this).
    """

    def __init__(self, filters: list[Tensor], lr: float, momentum: float = 0.95, nesterov: bool = True) -> None:
        self.filters = list(filters)
        if any(f.ndim != 4 for f in self.filters):
            raise ValueError("FilterMuon optimises 4-D convolution filters only")
        views = [_matrix_view(f) for f in self.filters]
        self._channels_last = [cl for _, cl in views]
        super().__init__([v for v, _ in views], lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0,
                         adjust_lr_fn="original")
        self._normalize()

    def _views(self) -> list[Tensor]:
        return self.param_groups[0]["params"]

    @torch.no_grad()
    def _normalize(self) -> None:
        for view in self._views():
            view.div_(view.norm(dim=1, keepdim=True).clamp_min(_TINY))

    @torch.no_grad()
    def step(self, closure=None):
        """Muon's step on the filters' gradients (as matrices), then each filter back to unit length."""
        for view, filters, channels_last in zip(self._views(), self.filters, self._channels_last):
            view.grad = None if filters.grad is None else _as_matrix(filters.grad, channels_last)
        loss = super().step(closure)
        for view in self._views():
            view.grad = None
        self._normalize()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the filters' own gradients (the views hold none between steps)."""
        for filters in self.filters:
            if filters.grad is not None:
                if set_to_none:
                    filters.grad = None
                else:
                    filters.grad.zero_()
