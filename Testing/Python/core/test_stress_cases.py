"""The stress benchmark's case generator: seeded, every listed variety present, sound ground truth."""

import numpy as np
import pytest

import stress_cases


def _same_case(a, b):
    assert a.spec == b.spec
    assert len(a.channels) == len(b.channels)
    for x, y in zip(a.channels, b.channels):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.truth, b.truth)
    assert (a.mask is None) == (b.mask is None)
    if a.mask is not None:
        np.testing.assert_array_equal(a.mask, b.mask)


def _first_case(**design):
    return next(s.index for s in stress_cases.all_specs() if all(getattr(s, k) == v for k, v in design.items()))


@pytest.mark.parametrize("layout", stress_cases.LAYOUTS)
def test_same_seed_same_case_other_seed_other_case(layout):
    index = _first_case(layout=layout)
    case = stress_cases.make_case(index)
    _same_case(case, stress_cases.make_case(index))
    other = stress_cases.make_case(index, base_seed=stress_cases.BASE_SEED + 1)
    assert other.spec != case.spec or not np.array_equal(other.truth, case.truth)


def test_every_listed_variety_occurs():
    specs = stress_cases.all_specs()
    assert len(specs) >= 300
    for axis, values in stress_cases.VARIETY_AXES.items():
        seen = {getattr(s, axis) for s in specs}
        assert seen == set(values), (axis, set(values) - seen)
    # with and without a mask, 2D and 3D, K up to 8
    assert {s.mask == "none" for s in specs} == {True, False}
    assert {len(s.shape) for s in specs} == {2, 3}
    assert max(s.n_classes for s in specs) == 8


@pytest.mark.parametrize("index", range(0, stress_cases.N_CASES, 9))
def test_truth_covers_every_class_and_matches_the_design(index):
    case = stress_cases.make_case(index)
    spec = case.spec
    region = case.region
    counts = np.bincount(case.truth[region], minlength=spec.n_classes + 1)
    assert counts.size == spec.n_classes + 1 and counts[0] == 0
    assert (counts[1:] >= stress_cases.MIN_CLASS_VOXELS).all(), counts
    assert not case.truth[~region].any()
    assert len(case.channels) == spec.n_channels
    expected_dtype = {"float32": np.float32, "offset": np.float32, "int16": np.int16, "uint8": np.uint8}[spec.dtype]
    assert all(c.dtype == expected_dtype and c.shape == spec.shape for c in case.channels)
    if spec.dtype == "offset":
        assert case.channels[0][region].min() > 500
    if spec.channel_mode == "identical":
        np.testing.assert_array_equal(case.channels[0], case.channels[-1])
    if spec.balance == "tiny":
        assert counts[1:].min() / region.sum() < 0.02
    if spec.mask == "box16":
        assert case.mask.any(axis=(1, 2)).sum() == 16
    if spec.layout == "3d-2slice":
        assert spec.shape[0] == 2
    for channel in case.channels:  # no channel constant inside the mask (that is a user error, not a case)
        assert channel[region].min() < channel[region].max()
