"""Training plumbing: the learning-rate schedule."""

from __future__ import annotations

import pytest

from covidseg.learning.loop import lr_at


def test_cosine_schedule_warms_up_then_decays_to_one_percent():
    lrs = [lr_at(step, 100, 1.0, "cosine", warmup=10) for step in range(1, 101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))  # never rises after warm-up
    assert lrs[-1] == pytest.approx(0.01)
    assert lr_at(55, 100, 1.0, "cosine", warmup=10) == pytest.approx(0.505)  # half-way: the mean


def test_constant_schedule_and_unknown_names():
    assert {lr_at(s, 50, 3e-4, "constant") for s in range(1, 51)} == {3e-4}
    with pytest.raises(ValueError, match="schedule"):
        lr_at(1, 10, 1.0, "step")
