"""Muon for convolution filters: torch.optim.Muon's step on the flattened filters, unit-length
filters, the channels-last layout, and a training run that uses it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from densenet.muon import FilterMuon, filter_parameters
from densenet.registry import create_model


def _filters(out=8, inp=5, k=3, seed=0) -> nn.Parameter:
    generator = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(out, inp, k, k, generator=generator))


def _grads(shape, steps, seed=1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


def _unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    return matrix / matrix.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("shape", [(8, 5, 3, 3), (64, 16, 1, 1)], ids=["wide", "tall"])
def test_steps_are_torch_muon_on_the_flattened_filters_then_unit_length(shape):
    filters = _filters(*shape[:3])
    start = filters.detach().clone()
    muon = FilterMuon([filters], lr=0.1, momentum=0.9)
    # building it rescales each filter to unit length, in place
    torch.testing.assert_close(filters.detach().flatten(1), _unit_rows(start.flatten(1)))
    reference = _unit_rows(start.flatten(1)).clone().requires_grad_()
    torch_muon = torch.optim.Muon([reference], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0)
    for grad in _grads(shape, 3):
        filters.grad = grad.clone()
        muon.step()
        muon.zero_grad()
        assert filters.grad is None
        reference.grad = grad.flatten(1).clone()
        torch_muon.step()
        with torch.no_grad():
            reference.copy_(_unit_rows(reference))
        torch.testing.assert_close(filters.detach().flatten(1), reference.detach(), rtol=0, atol=1e-6)
    assert torch.allclose(filters.detach().flatten(1).norm(dim=1), torch.ones(shape[0]))
    # the step is an orthogonalised one: every filter turned, by about the learning rate per step
    cosines = (filters.detach().flatten(1) * _unit_rows(start.flatten(1))).sum(1)
    assert torch.all(cosines < 0.999) and torch.all(cosines > 0.9)


def test_channels_last_filters_take_the_same_steps():
    plain = _filters(16, 8)
    channels_last = nn.Parameter(plain.detach().clone().to(memory_format=torch.channels_last))
    pointer = channels_last.data_ptr()
    muons = [FilterMuon([p], lr=0.05, momentum=0.95) for p in (plain, channels_last)]
    for grad in _grads(plain.shape, 4):
        plain.grad = grad.clone()
        channels_last.grad = grad.clone().to(memory_format=torch.channels_last)
        for muon in muons:
            muon.step()
            muon.zero_grad()
    assert channels_last.data_ptr() == pointer and channels_last.is_contiguous(memory_format=torch.channels_last)
    # Newton-Schulz runs in bf16: the permuted columns change its rounding, not its result
    torch.testing.assert_close(channels_last.detach(), plain.detach(), rtol=0, atol=2e-3)
    assert not torch.equal(plain.detach(), _unit_rows(_filters(16, 8).flatten(1)).view_as(plain))


def test_filter_parameters_are_the_trainable_convolutions_only():
    model = create_model("densenet-cpu-s")
    model.features.conv0.weight.requires_grad_(False)  # a frozen (whitened) stem stays out
    filters = filter_parameters(model)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad]
    assert [id(p) for p in filters] == [id(p) for p in convs] and len(filters) == len(convs) > 5
    with pytest.raises(ValueError, match="4-D"):
        FilterMuon([nn.Parameter(torch.ones(3, 4))], lr=0.1)


def test_muon_keeps_a_densenet_computing_the_same_function():
    """Rescaling the filters at the start changes nothing: each one feeds a BatchNorm."""
    torch.manual_seed(0)
    model = create_model("densenet-bc-10-4", num_classes=3).train()
    x = torch.randn(8, 3, 32, 32)
    before = model(x)
    FilterMuon(filter_parameters(model), lr=0.1)
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)
