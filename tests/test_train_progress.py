"""The training progress line: ETA arithmetic and wording (pure functions, no training)."""

from __future__ import annotations

import pytest

from scatac_dist.train.progress import eta, format_duration, progress_text


def test_eta_to_the_floor_and_to_max_iter():
    assert eta(2400, 10_000, 30_000, 0.01) == pytest.approx((76.0, 276.0))
    assert eta(10_000, 10_000, 30_000, 0.01) == pytest.approx((None, 200.0))   # at the floor: no floor left
    assert eta(12_000, 10_000, 30_000, 0.5) == pytest.approx((None, 9000.0))
    assert eta(100, 30_000, 30_000, 0.01) == pytest.approx((None, 299.0))      # no early stop before the end
    assert eta(100, 0, 1_000, 2.0) == pytest.approx((None, 1800.0))           # the paper's rule alone
    assert eta(1_000, 10, 1_000, 1.0) == (None, 0.0)                           # done


def test_durations():
    assert [format_duration(s) for s in (0.4, 45, 110, 599.4, 599.6, 960, 3600, 7500)] == \
        ["0s", "45s", "1m50s", "9m59s", "10m", "16m", "1h00m", "2h05m"]


def test_progress_line():
    sps = 32 / 1210  # 1,210 cells/s at batch 32
    assert progress_text(2400, 10_000, 30_000, sps, 32) == (
        "step 2,400/30,000 (early stop possible after 10,000) · 1,210 cells/s · ETA 3m21s to the floor, at most 12m")
    assert progress_text(12_400, 10_000, 30_000, sps, 32) == (
        "step 12,400/30,000 (early stop possible) · 1,210 cells/s · ETA at most 7m45s")
    assert progress_text(2400, 30_000, 30_000, sps, 32) == "step 2,400/30,000 · 1,210 cells/s · ETA 12m"
    assert progress_text(0, 10_000, 30_000, None, 32).endswith("ETA ?")
