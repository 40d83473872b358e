"""The time-budget arithmetic (:mod:`densenet.budget`): epochs that fit, to the step, and the reserve for
a run's end. The trainer's use of it is tested in test_train.py (virtual clocks, a faked fit)."""

from __future__ import annotations

import numpy as np
import pytest

from densenet.budget import budget_reserve, fitting_epochs


def test_fitting_epochs_arithmetic():
    # 100 steps of 0.5 s and a 10 s evaluation: 60 s an epoch; 600 s less the 4% margin, 20 s spent after
    # 10 steps: 556 s left, 926 more steps
    assert fitting_epochs(600, 20, 0.5, 10, 100, 10, 1, most=50) == 9.36
    assert fitting_epochs(600, 20, 0.5, 10, 100, 10, 1, most=50, extra_seconds=6) == 9.26  # 916 more steps
    assert fitting_epochs(600, 20, 0.5, 10, 100, 10, 2, most=50) == 10.2  # an evaluation every 2 epochs: 1010
    assert fitting_epochs(600, 20, 0.5, 10, 100, 10, 1, most=4) == 4
    assert fitting_epochs(60, 20, 0.5, 10, 100, 10, 1, most=50, least=2) == 2
    assert fitting_epochs(600, 700, 0.5, 250, 100, 10, 1, most=50, least=2.51) == 2.51  # over budget
    # 250 steps (2.5 epochs) done, by this process or an earlier one: the budget left is this process's
    assert fitting_epochs(600, 20, 0.5, 250, 100, 10, 1, most=50) == 11.76
    # 9.06 epochs would fit: not a stub of 6 steps at the end, 9 whole epochs
    assert fitting_epochs(600, 20, 0.5, 10, 100, 10, 1, most=50, extra_seconds=18) == 9.0


def test_budget_reserve_arithmetic():
    # per-view seconds 10, 14, 9, 8 so far: the slowest of the last three (14 s) for a 6-view final
    # evaluation, 20% more, and twice the last checkpoint's 1.5 s write
    assert budget_reserve([10.0, 14.0, 9.0, 8.0], 6, 1.5) == pytest.approx(1.2 * 6 * 14 + 3)
    # an evaluation four back no longer counts: only the last three price the final one
    assert budget_reserve([30.0, 14.0, 9.0, 8.0], 6, 0.0) == pytest.approx(1.2 * 6 * 14)
    assert budget_reserve([8.0], 2, 0.5) == pytest.approx(1.2 * 2 * 8 + 1)
    # nothing evaluated yet (a resumed run before its first evaluation): only the writes
    assert budget_reserve([], 6, 1.5) == 3


def test_fitting_epochs_counts_cheaper_steps():
    # every step at its full cost: the same as without a cost
    ones = lambda progress: np.ones_like(progress)  # noqa: E731
    for args, kw in [((600, 20, 0.5, 10, 100, 10, 1), dict(most=50)),
                     ((600, 20, 0.5, 10, 100, 10, 1), dict(most=50, extra_seconds=18)),
                     ((600, 20, 0.5, 250, 100, 10, 2), dict(most=50)),
                     ((600, 20, 0.5, 10, 100, 10, 1), dict(most=4))]:
        assert fitting_epochs(*args, step_cost=ones, **kw) == fitting_epochs(*args, **kw)
    # steps at half the cost: 0.25 s and a tenth of the 10 s evaluation each, 556 s for 1588 more steps
    half = lambda progress: np.full_like(progress, 0.5)  # noqa: E731
    assert fitting_epochs(600, 20, 0.5, 10, 100, 10, 1, most=50, step_cost=half) == 15.98
    # a quarter of the cost in the first half of the run: T steps cost 0.5 s x (T/2 x 0.25 + T/2) plus T/100 x 10 s,
    # so 576 s buy T = 576 / 0.4125 = 1396 steps (the cheap ones end at step 698)
    cheap_first = lambda progress: np.where(progress < 0.5, 0.25, 1.0)  # noqa: E731
    assert fitting_epochs(600, 0, 0.5, 0, 100, 10, 1, most=50, step_cost=cheap_first) == 13.96
