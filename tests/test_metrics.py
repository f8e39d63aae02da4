"""Summary metrics against matrices computed by hand (docs/methods.md definitions)."""
import math

import pytest

from harness import metrics

# a[t][i]: accuracy on task i after task t
MATRIX = [
    [90.0],
    [70.0, 80.0],
    [75.0, 40.0, 60.0],
]
STEP = [90.0, 75.0, 58.0]


def test_average_incremental_and_last():
    assert metrics.average_incremental_accuracy(STEP) == pytest.approx((90 + 75 + 58) / 3)
    assert metrics.last_accuracy(STEP) == 58.0


def test_chaudhry_forgetting_uses_the_best_earlier_accuracy():
    # task 0: best before T = max(90, 70) = 90, final 75 -> 15; task 1: max(80) - 40 = 40
    assert metrics.per_task_forgetting(MATRIX) == [15.0, 40.0]
    assert metrics.average_forgetting(MATRIX) == pytest.approx(27.5)


def test_bwt_is_final_minus_just_learned():
    # (75 - 90 + 40 - 80) / 2
    assert metrics.backward_transfer(MATRIX) == pytest.approx(-27.5)


def test_avalanche_forgetting_differs_from_chaudhry_when_accuracy_recovers():
    m = [[50.0], [80.0, 90.0], [60.0, 70.0, 85.0]]
    # Chaudhry: task 0 max(50, 80) - 60 = 20; Avalanche: 50 - 60 = -10
    assert metrics.per_task_forgetting(m)[0] == 20.0
    assert metrics.avalanche_forgetting(m) == pytest.approx(((50 - 60) + (90 - 70)) / 2)
    assert metrics.average_forgetting(m) == pytest.approx((20 + 20) / 2)
    # Avalanche's BWT is minus its forgetting, which is Lopez-Paz's BWT
    assert metrics.backward_transfer(m) == pytest.approx(-metrics.avalanche_forgetting(m))


def test_single_task_has_no_forgetting():
    s = metrics.summarise([[42.0]], [42.0])
    assert s["average_forgetting"] is None and s["bwt"] is None and s["per_task_forgetting"] == []
    assert s["avg_incremental_accuracy"] == s["last_accuracy"] == 42.0


def test_malformed_matrix_is_rejected():
    with pytest.raises(ValueError):
        metrics.per_task_forgetting([[1.0], [2.0]])
    assert not math.isnan(metrics.average_forgetting(MATRIX))
