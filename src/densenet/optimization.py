"""A run's optimisation state: the optimisers, their learning-rate schedules, the fp16 gradient scaler
and the weight averages that follow the steps (EMA, lookahead).

:class:`Optimization` builds them from a :class:`densenet.config.TrainConfig`'s settings, takes one
optimisation step from a loss (:meth:`Optimization.step`), and saves and restores all of them
under the checkpoint keys ``optimizer``, ``scheduler``, ``muon``, ``scaler``, ``ema`` and
``lookahead`` (:meth:`Optimization.state_dict`; checkpoints written before this module existed
load unchanged). :class:`densenet.trainer.Trainer` owns one per run.

- SGD (momentum, Nesterov, weight decay) takes every parameter, or with ``--optimizer muon`` every
  parameter but the convolution filters, which :class:`densenet.muon.FilterMuon` takes;
  ``--bn-lr-scale`` gives the BatchNorm parameters their own SGD group (:func:`parameter_groups`).
- One :class:`torch.optim.lr_scheduler.LambdaLR` per optimiser, all on the same schedule factor.
- ``--amp fp16``: a :class:`torch.amp.GradScaler` (SGD only: the config's validation keeps Muon out).
- ``--ema``: an exponential moving average of the weights, the model evaluated and saved.
- ``--lookahead``: :class:`densenet.lookahead.Lookahead`, which ends the run on its slow weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from densenet.errors import TrainingError
from densenet.lookahead import Lookahead
from densenet.muon import FilterMuon, filter_parameters

__all__ = ["Optimization", "parameter_groups", "CHECKPOINT_KEYS"]

# the checkpoint entries that Optimization.state_dict writes and load_state_dict reads
CHECKPOINT_KEYS = ("optimizer", "scheduler", "muon", "scaler", "ema", "lookahead")


def parameter_groups(model: torch.nn.Module, config, exclude=()) -> list[dict]:
    """The SGD optimizer's parameter groups: one, or with ``bn_lr_scale`` != 1 a second one holding the
    BatchNorm weights and biases at ``lr x scale`` and ``weight_decay / scale``. ``exclude``: parameters
    another optimizer takes (--optimizer muon: the convolution filters). ``config``: a TrainConfig."""
    taken = {id(p) for p in exclude}
    params = [p for p in model.parameters() if id(p) not in taken]
    scale = config.bn_lr_scale
    if scale == 1:
        return [{"params": params}]
    norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             for p in m.parameters(recurse=False)}
    return [{"params": [p for p in params if id(p) not in norms]},
            {"params": [p for p in params if id(p) in norms],
             "lr": config.lr * scale, "weight_decay": config.weight_decay / scale}]


class Optimization:
    """The optimisers of ``model`` and what rides on their steps, as ``config`` (a TrainConfig) asks.

    ``lr_factor(step)``: the schedule's factor on every base learning rate after ``step`` optimizer
    steps (each optimiser's :class:`~torch.optim.lr_scheduler.LambdaLR` calls it).
    """

    def __init__(self, model: torch.nn.Module, config, lr_factor: Callable[[int], float], device_type: str) -> None:
        c = config
        # --optimizer muon: Muon takes the convolution filters (and rescales them to unit length now)
        self.muon = (FilterMuon(filter_parameters(model), lr=c.muon_lr, momentum=c.muon_momentum)
                     if c.optimizer == "muon" else None)
        self.sgd = torch.optim.SGD(
            parameter_groups(model, c, exclude=self.muon.filters if self.muon else ()), lr=c.lr,
            momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay,
        )
        self.optimizers = [self.sgd] + ([self.muon] if self.muon else [])
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lr_factor) for opt in self.optimizers]
        self.scaler = torch.amp.GradScaler(device_type) if c.amp == "fp16" else None
        self.ema = None
        if c.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(c.ema), use_buffers=True)
        self.lookahead = Lookahead(model, c.lookahead) if c.lookahead else None

    @property
    def lr(self) -> float:
        """SGD's current learning rate (its first group's)."""
        return self.sgd.param_groups[0]["lr"]

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to evaluate and save: the EMA weights with --ema, else ``model`` itself."""
        return self.ema.module if self.ema is not None else model

    def step(self, loss: torch.Tensor, model: torch.nn.Module, step: int, total_steps: int) -> None:
        """Optimizer step ``step`` (counted from 1) of ``total_steps`` on ``loss``: gradients, the
        optimisers, their schedules, then the lookahead and EMA weights of ``model``."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:  # fp16 (validate() keeps Muon out of it)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.sgd)
            self.scaler.update()
        else:
            loss.backward()
            for optimizer in self.optimizers:
                optimizer.step()
        for scheduler in self.schedulers:
            scheduler.step()
        if self.lookahead is not None:
            self.lookahead.step(model, step, total_steps)
        if self.ema is not None:
            self.ema.update_parameters(model)

    def rebase(self, step: int, factor: float) -> None:
        """Move every schedule to ``step``, where the schedule's factor is ``factor`` (a resumption
        under a different number of processes restarts the step count)."""
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            scheduler.last_epoch = step
            lrs = [base * factor for base in scheduler.base_lrs]
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
            scheduler._last_lr = lrs

    def state_dict(self) -> dict:
        """The checkpoint's entries (:data:`CHECKPOINT_KEYS`); what a run does not use is ``{}``."""
        return {
            "optimizer": self.sgd.state_dict(),
            "scheduler": self.schedulers[0].state_dict(),
            "muon": ({"optimizer": self.muon.state_dict(), "scheduler": self.schedulers[1].state_dict()}
                     if self.muon is not None else {}),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "ema": self.ema.state_dict() if self.ema is not None else {},
            "lookahead": self.lookahead.state_dict() if self.lookahead is not None else {},
        }

    def load_state_dict(self, checkpoint: dict) -> None:
        """Restore from a checkpoint's entries. :class:`TrainingError` where the run uses Muon, EMA or
        lookahead and the checkpoint lacks them; torch's KeyError/ValueError/RuntimeError where an
        entry does not match (the trainer turns those into one message)."""
        self.sgd.load_state_dict(checkpoint["optimizer"])
        self.schedulers[0].load_state_dict(checkpoint["scheduler"])
        if self.muon is not None:
            if not checkpoint.get("muon"):
                raise TrainingError("the checkpoint has no Muon state; resume with --optimizer sgd or start afresh")
            self.muon.load_state_dict(checkpoint["muon"]["optimizer"])
            self.schedulers[1].load_state_dict(checkpoint["muon"]["scheduler"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema is not None:
            if not checkpoint.get("ema"):
                raise TrainingError("the checkpoint has no EMA weights; resume without --ema or start afresh")
            self.ema.load_state_dict(checkpoint["ema"])
        if self.lookahead is not None:
            if not checkpoint.get("lookahead"):
                raise TrainingError("the checkpoint has no lookahead weights; resume without --lookahead or "
                                    "start afresh")
            self.lookahead.load_state_dict(checkpoint["lookahead"])
