"""Progress is reported every iteration; returning False or setting the cancel event stops the run."""

import threading

import numpy as np
import pytest

from DeepGMMSegmentLib import SegmentationCancelled, segment


def _img():
    return np.random.default_rng(0).normal(size=(24, 24)).astype(np.float32)


@pytest.mark.parametrize("method", ["em-gmm", "em-svgmm", "deepsvg"])
def test_progress_called_every_iteration(method):
    calls = []
    extra = dict(base_width=4, warm_start_iter=2) if method.startswith("deep") else {}
    result = segment(_img(), 3, method=method, max_iter=15, tol=0, progress=lambda *a: calls.append(a), **extra)
    assert [c[0] for c in calls] == list(range(1, result.n_iter + 1))
    # deep: the 2 warm-start steps count as iterations, so progress moves from the first step
    expected_max = 15 + (2 if method.startswith("deep") else 0)
    assert all(c[1] == expected_max for c in calls)
    assert result.n_iter == expected_max  # tol=0: never stops early
    assert all(np.isfinite(c[2]) for c in calls)
    elapsed = [c[3] for c in calls]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0


@pytest.mark.parametrize("method", ["em-gmm", "deepg"])
def test_progress_returning_false_cancels(method):
    seen = []

    def progress(iteration, max_iterations, nll, elapsed):
        seen.append(iteration)
        return iteration < 3

    extra = dict(base_width=4, warm_start_iter=2) if method.startswith("deep") else {}
    with pytest.raises(SegmentationCancelled):
        segment(_img(), 3, method=method, max_iter=50, tol=0, progress=progress, **extra)
    assert seen == [1, 2, 3]


def test_cancel_event_stops_the_run():
    event = threading.Event()
    seen = []

    def progress(iteration, *_):
        seen.append(iteration)
        if iteration == 2:
            event.set()  # e.g. a Cancel button pressed on another thread

    with pytest.raises(SegmentationCancelled):
        segment(_img(), 3, method="em-svgmm", max_iter=50, tol=0, progress=progress, cancel_event=event)
    assert seen == [1, 2]
