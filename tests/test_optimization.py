"""A run's optimisation state (:mod:`densenet.optimization`): parameter groups, the steps, and the
checkpoint round trip that a resumed run relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from densenet import config as C
from densenet.errors import TrainingError
from densenet.optimization import CHECKPOINT_KEYS, Optimization, parameter_groups
from densenet.registry import create_model

TOTAL = 12  # steps of the runs below


def test_bn_lr_scale_puts_the_batchnorm_parameters_in_a_group_of_their_own():
    model = create_model("densenet-bc-10-4")
    assert len(parameter_groups(model, C.TrainConfig())) == 1
    others, norms = parameter_groups(model, C.TrainConfig(lr=0.1, weight_decay=5e-4, bn_lr_scale=8.0))
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms["params"]) == 2 * len(bn) and {id(p) for p in norms["params"]} == {
        id(p) for m in bn for p in (m.weight, m.bias)}
    assert len(others["params"]) + len(norms["params"]) == len(list(model.parameters()))
    assert norms["lr"] == pytest.approx(0.8) and norms["weight_decay"] == pytest.approx(5e-4 / 8)
    # the schedule scales both groups alike: the BN group stays at 8x the others' learning rate
    opt = torch.optim.SGD([others, norms], lr=0.1, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert sched.get_last_lr() == pytest.approx([0.05, 0.4])


def _config(**options) -> C.TrainConfig:
    return C.TrainConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, bn_lr_scale=4.0, **options)


def _setup(config: C.TrainConfig):
    torch.manual_seed(0)
    model = create_model("densenet-bc-10-4", num_classes=3)
    return model, Optimization(model, config, lambda s: 1.0 - s / TOTAL, "cpu")


def _steps(model, opt, first: int, last: int) -> None:
    """Optimizer steps first..last (counted from 1) on fixed random batches."""
    for step in range(first, last + 1):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.step(F.cross_entropy(model(x), y), model, step, TOTAL)


@pytest.mark.parametrize("options", [dict(), dict(optimizer="muon", muon_lr=0.05, lookahead=0.7, ema=0.9)],
                         ids=["sgd", "muon-lookahead-ema"])
def test_a_restored_state_continues_exactly_like_the_uninterrupted_one(options):
    config = _config(**options)
    model, opt = _setup(config)
    _steps(model, opt, 1, TOTAL)
    assert opt.lr == pytest.approx(0.0)  # the schedule's factor reached 0 at the last step

    halfway, first = _setup(config)
    _steps(halfway, first, 1, 5)
    saved = {"model": halfway.state_dict(), **first.state_dict()}
    assert set(saved) - {"model"} == set(CHECKPOINT_KEYS)  # the checkpoint keys resumed runs depend on
    assert bool(saved["muon"]) == (config.optimizer == "muon") and bool(saved["ema"]) == bool(config.ema)

    resumed, second = _setup(config)
    assert not torch.equal(resumed.state_dict()["features.conv0.weight"], saved["model"]["features.conv0.weight"])
    resumed.load_state_dict(saved["model"])
    second.load_state_dict(saved)
    assert second.lr == pytest.approx(first.lr)
    _steps(resumed, second, 6, TOTAL)
    for name, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    for name, value in opt.eval_model(model).state_dict().items():
        assert torch.equal(value, second.eval_model(resumed).state_dict()[name]), name


def test_a_checkpoint_without_the_state_a_run_needs_is_refused():
    for options, key, missing in ((dict(optimizer="muon"), "muon", "Muon state"), (dict(ema=0.9), "ema", "EMA weights"),
                                  (dict(lookahead=0.7), "lookahead", "lookahead weights")):
        model, opt = _setup(_config(**options))
        _steps(model, opt, 1, 2)
        saved = opt.state_dict()
        opt.load_state_dict(saved)  # complete: accepted
        saved[key] = {}  # as a run without the option writes it
        with pytest.raises(TrainingError, match=missing):
            opt.load_state_dict(saved)


def test_rebase_moves_every_schedule_to_a_step():
    model, opt = _setup(_config(optimizer="muon", muon_lr=0.05))
    opt.rebase(6, 0.5)
    assert [s.last_epoch for s in opt.schedulers] == [6, 6]
    assert [g["lr"] for g in opt.sgd.param_groups] == pytest.approx([0.05, 0.2])  # bn_lr_scale 4
    assert [g["lr"] for g in opt.muon.param_groups] == pytest.approx([0.025])
    _steps(model, opt, 7, 7)
    assert opt.lr == pytest.approx(0.1 * (1 - 7 / TOTAL))  # and the schedule goes on from there
