"""The time budget of a run (``--max-minutes``): how many epochs fit (``--fit-epochs``) and what to keep
for the run's end.

Pure arithmetic on measured times, so that it can be checked to the step: the trainer
(:mod:`densenet.trainer`) times its steps and evaluations and asks :func:`fitting_epochs` how many
epochs fit, first after step ``FIT_STEPS[1]`` and again after each epoch, and stops a budgeted run
once less than :func:`budget_reserve` is left.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["FIT_STEPS", "FIT_MARGIN", "EVAL_COST", "SHORTEST_LAST_EPOCH", "fitting_epochs", "RESERVE_EVALS",
           "RESERVE_MARGIN", "budget_reserve"]

# --fit-epochs times optimizer steps FIT_STEPS[0]+1 .. FIT_STEPS[1] of a fresh run (the first ones
# warm up the allocator and caches) and fits the epochs to the budget; after each epoch it fits them
# again from the mean measured step and per-epoch evaluation times so far. It leaves this fraction of the budget
# unplanned (for the speed to vary within an epoch, the final evaluation and the weights' writing),
# and takes an evaluation it has not timed yet to cost this fraction of a training step per image
FIT_STEPS = (5, 35)
FIT_MARGIN = 0.04
EVAL_COST = 1 / 3
SHORTEST_LAST_EPOCH = 0.1  # a fit that would end within the first tenth of an epoch ends before it


def fitting_epochs(budget: float, elapsed: float, seconds_per_step: float, steps_done: int, steps_per_epoch: int,
                   eval_seconds: float, eval_every: int, most: float, least: float = 1.0,
                   extra_seconds: float = 0.0, step_cost: Callable[[np.ndarray], np.ndarray] | None = None) -> float:
    """The epochs in all (a whole number of steps, in [least, most]) that fit in ``budget`` seconds.

    ``elapsed`` of the budget is spent and ``steps_done`` steps are done (this run's, earlier
    processes' included: the budget is this process's). Each further epoch costs its steps at
    ``seconds_per_step`` plus, every ``eval_every`` epochs, an evaluation of ``eval_seconds``;
    ``extra_seconds`` are spent once more at the end (a final evaluation with TTA); ``FIT_MARGIN`` of
    the budget stays unplanned. The last epoch may end within the epoch, though not within its first
    ``SHORTEST_LAST_EPOCH``. ``step_cost`` (progressive resizing) maps the steps' fractions of the run
    to their cost relative to ``seconds_per_step``; without it every step costs that.
    """
    per_epoch = steps_per_epoch * seconds_per_step + eval_seconds / eval_every
    available = max(0.0, budget * (1 - FIT_MARGIN) - elapsed - extra_seconds)
    if step_cost is None:
        steps = steps_done + math.floor(available / per_epoch * steps_per_epoch)
    else:
        def needed(total: int) -> float:  # the seconds of steps steps_done .. total - 1 and their evaluations
            cost = float(np.sum(step_cost(np.arange(steps_done, total) / total)))
            return seconds_per_step * cost + (total - steps_done) * eval_seconds / eval_every / steps_per_epoch

        low, high = steps_done, max(steps_done, math.ceil(most * steps_per_epoch))
        if needed(high) <= available:
            low = high
        while high - low > 1:  # the most steps that fit: needed() grows with the total
            middle = (low + high) // 2
            low, high = (middle, high) if needed(middle) <= available else (low, middle)
        steps = low
    if steps % steps_per_epoch < steps_per_epoch * SHORTEST_LAST_EPOCH:  # no stub of an epoch at the end
        steps -= steps % steps_per_epoch
    return max(least, min(most, steps / steps_per_epoch))


# A run with a time budget stops early enough for what follows its last step: a checkpoint, the final
# evaluation and the weights. The final evaluation is priced at the slowest per-view time of the last
# RESERVE_EVALS evaluations, RESERVE_MARGIN more for a machine that slows down meanwhile (on the
# shared Xeon the final 6-view evaluation took up to 1.26x the time per view of the evaluation before).
RESERVE_EVALS = 3
RESERVE_MARGIN = 1.2


def budget_reserve(view_seconds: list[float], final_views: int, write_seconds: float) -> float:
    """The seconds a budgeted run keeps for its end: a final evaluation of ``final_views`` views, given
    the per-view seconds of the evaluations so far (none: nothing to price it by), and twice the last
    checkpoint's ``write_seconds`` (the checkpoint of the stop, then the smaller weights twice)."""
    evaluation = RESERVE_MARGIN * final_views * max(view_seconds[-RESERVE_EVALS:]) if view_seconds else 0.0
    return evaluation + 2 * write_seconds
