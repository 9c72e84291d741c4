"""Fast regression subset of the stress benchmark (benchmarks/stress.py, docs/robustness.md).

Each test runs one method of ours on one generated case and asserts that it does not crash and that
its mean Dice (Hungarian-matched to the truth) is within 0.02 of scikit-learn's GaussianMixture
(full covariance, n_init=10, on the same z-scored voxels), computed here in the same run.

The cases are picked by a fixed rule, not by their results: every 10th case of the generator with at
most 112 x 112 voxels for the two EM methods, every 32nd with at most 80 x 80 voxels for the two
deep methods. A failure names the case and the command that reproduces it.
"""

import functools

import pytest

import stress
import stress_cases

EM_SUBSET = [s.index for s in stress_cases.all_specs() if s.index % 10 == 0 and s.n_voxels <= 112 * 112]
DEEP_SUBSET = [s.index for s in stress_cases.all_specs() if s.index % 32 == 0 and s.n_voxels <= 80 * 80]
MAX_DICE_GAP = 0.02
# Known gaps, listed in docs/robustness.md: strict, so a fix turns them into failures to remove here.
KNOWN_GAPS = {
    (230, "em-svgmm"): "ML per-voxel weights (the paper's SVGMM without a prior) drift from the GMM optimum",
}


def _params(indices, methods):
    """(index, method) pairs, the known gaps marked as strict expected failures."""
    return [pytest.param(i, m, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[i, m]))
            if (i, m) in KNOWN_GAPS else (i, m) for i in indices for m in methods]


@functools.lru_cache(maxsize=None)
def _case(index):
    return stress_cases.make_case(index)


@functools.lru_cache(maxsize=None)
def _reference(index):
    record = stress.run_job(_case(index), stress.REFERENCE)
    assert record["status"] == "ok", record
    return record


def _check(index, method):
    case = _case(index)
    record = stress.run_job(case, method)
    where = f"case {index} ({case.spec.describe()}); reproduce: python benchmarks/stress.py --case {index} " \
            f"--method {method}"
    assert record["status"] == "ok", f"{method} crashed on {where}: {record['error_kind']}: {record['error']}"
    reference = _reference(index)["dice"]
    assert record["dice"] >= reference - MAX_DICE_GAP, (
        f"{method} Dice {record['dice']:.3f} vs scikit-learn n_init=10 {reference:.3f} "
        f"(empty classes: {record['empty_classes']}) on {where}")


def test_subsets_follow_the_rule_and_cover_both_dimensions():
    assert 15 <= len(EM_SUBSET) <= 30 and 3 <= len(DEEP_SUBSET) <= 6
    for subset in (EM_SUBSET, DEEP_SUBSET):
        assert {len(stress_cases.case_spec(i).shape) for i in subset} == {2, 3}


@pytest.mark.parametrize(("index", "method"), _params(EM_SUBSET, stress.EM))
def test_em_within_002_of_sklearn(index, method):
    _check(index, method)


@pytest.mark.parametrize("method", stress.DEEP)
@pytest.mark.parametrize("index", DEEP_SUBSET)
def test_deep_within_002_of_sklearn(index, method):
    _check(index, method)
