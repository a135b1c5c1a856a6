"""Tests of nnunet_ext.losses.schedules: DLKUNet's phase-based (Eq. 11) and dynamic (Eq. 12-13) Dice/CE weights at
the first epoch, the midpoint and the last epoch, against the formulas computed by hand."""
import math
import pickle

import pytest

from nnunet_ext.losses.schedules import DynamicLossSchedule, PhaseLossSchedule


@pytest.mark.parametrize("num_epochs", [400, 1000, 2])
def test_phase_schedule_switches_after_the_first_half(num_epochs):
    schedule = PhaseLossSchedule()
    half = num_epochs // 2
    assert schedule(0, num_epochs) == (0.6, 0.4)  # 1-based epoch 1
    assert schedule(half - 1, num_epochs) == (0.6, 0.4)  # 1-based epoch N/2: the paper's epoch 200 of 400
    assert schedule(half, num_epochs) == (0.7, 0.3)  # 1-based epoch N/2 + 1
    assert schedule(num_epochs - 1, num_epochs) == (0.7, 0.3)


def test_phase_schedule_with_an_odd_epoch_count_and_another_switch():
    assert [PhaseLossSchedule()(e, 5) for e in range(5)] == [(0.6, 0.4)] * 2 + [(0.7, 0.3)] * 3  # 1-based 1, 2 <= 2.5
    early = PhaseLossSchedule(switch_fraction=0.25)
    assert [early(e, 8)[0] for e in range(8)] == [0.6, 0.6] + [0.7] * 6


def dynamic_by_hand(x, n, k_times_epochs=30.0, a=0.3, b=0.7):
    k, x0 = k_times_epochs / n, 0.5 * n
    s = 1 - 1 / (1 + math.exp(-k * (x - x0)))
    return a + (1 - a) * s, 1 + (b - 1) * s


@pytest.mark.parametrize("num_epochs", [300, 1000, 2])
def test_dynamic_schedule_matches_eq_12_13(num_epochs):
    schedule = DynamicLossSchedule()
    for epoch in (0, num_epochs // 2, num_epochs - 1):
        assert schedule(epoch, num_epochs) == pytest.approx(dynamic_by_hand(epoch, num_epochs), abs=1e-12)
    # midpoint: s = 1/2 exactly -> alpha = A + (1 - A) / 2, beta = 1 + (B - 1) / 2
    assert schedule(num_epochs // 2, num_epochs) == pytest.approx((0.65, 0.85), abs=1e-12)


def test_dynamic_schedule_end_points_and_the_authors_300_epoch_slope():
    schedule = DynamicLossSchedule()
    # 300 epochs: k = 30 / 300 = 0.1 and x0 = 150, the authors' setting
    alpha0, beta0 = schedule(0, 300)
    s0 = 1 / (1 + math.exp(0.1 * (0 - 150)))
    assert (alpha0, beta0) == pytest.approx((0.3 + 0.7 * s0, 1 - 0.3 * s0), abs=1e-12)
    assert alpha0 == pytest.approx(1.0, abs=1e-6) and beta0 == pytest.approx(0.7, abs=1e-6)
    # the same shape for any run length: the first and last weights do not depend on num_epochs
    assert schedule(0, 1000) == pytest.approx(schedule(0, 300), abs=1e-12)
    alpha_end, beta_end = schedule(999, 1000)
    assert alpha_end == pytest.approx(0.3, abs=1e-6) and beta_end == pytest.approx(1.0, abs=1e-6)
    # monotone: alpha falls, beta rises
    weights = [schedule(e, 50) for e in range(50)]
    assert all(a1 < a0 and b1 > b0 for (a0, b0), (a1, b1) in zip(weights, weights[1:]))


def test_schedules_pickle_with_their_parameters():
    for schedule in (PhaseLossSchedule(switch_fraction=0.3), DynamicLossSchedule(A=0.2, k_times_epochs=10)):
        assert pickle.loads(pickle.dumps(schedule)) == schedule
