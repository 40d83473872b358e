"""Lookahead of the weights: the slow-weight arithmetic against a hand computation, and a run ending on them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from densenet.lookahead import Lookahead


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def perturb(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Move every floating-point entry of the model's state (as training would); return the new state."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.randn(value.shape, generator=generator))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_slow_weights_follow_by_the_ramped_decay_every_fifth_step():
    model = small_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    look = Lookahead(model, decay=0.8)
    fast = perturb(model, 1)
    for step in (1, 2, 3, 4):  # between updates nothing happens
        look.step(model, step, total_steps=10)
        assert all(torch.equal(model.state_dict()[k], fast[k]) for k in fast)
    look.step(model, 5, total_steps=10)
    keep = 0.8 * (5 / 10) ** 3  # 0.1 of the slow weights kept, 0.9 of the fast taken
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            expected = keep * start[key] + (1 - keep) * fast[key]
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
            assert torch.equal(look.slow[key], value)  # training restarts from the slow weights
        else:  # integer buffers (BatchNorm's batch count) are the model's own
            assert torch.equal(value, fast[key])


def test_the_last_step_ends_on_the_slow_weights():
    model = small_model()
    look = Lookahead(model, decay=0.5)
    perturb(model, 1)
    look.step(model, 5, total_steps=7)
    slow = {k: v.clone() for k, v in look.slow.items()}
    perturb(model, 2)
    look.step(model, 6, total_steps=7)
    assert not torch.equal(model[0].weight, slow["0.weight"])
    look.step(model, 7, total_steps=7)  # the fast steps since the last update are dropped
    for key, value in slow.items():
        assert torch.equal(model.state_dict()[key], value) and torch.equal(look.slow[key], value)


def test_state_round_trips_and_rejects_another_model():
    model = small_model()
    look = Lookahead(model, decay=0.5)
    perturb(model, 1)
    look.step(model, 5, total_steps=10)
    again = Lookahead(small_model(), decay=0.5)
    again.load_state_dict(look.state_dict())
    assert all(torch.equal(again.slow[k], look.slow[k]) for k in look.slow)
    with pytest.raises(ValueError, match="do not match"):
        Lookahead(nn.Linear(4, 3), decay=0.5).load_state_dict(look.state_dict())
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        Lookahead(model, decay=1.0)
