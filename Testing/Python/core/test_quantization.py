"""The quantisation floor: integer intensities are never fitted narrower than one step.

core.inputs.quantization_steps finds each channel's step; core.gmm.covariance_floor adds step^2 / 12
to every class variance (the variance of the data with the rounding undone). Without it a class
could shrink onto one or two levels of a channel with few levels and win the likelihood with a
spike: em-gmm got Dice 0.13 on stress case 14 and 0.75 on case 241 (docs/robustness.md).
"""

import numpy as np
import pytest
import torch

import stress_cases
from DeepGMMSegmentLib import segment
from DeepGMMSegmentLib.core import gmm
from DeepGMMSegmentLib.core.inputs import quantization_steps
from DeepGMMSegmentLib.options import REG_COVAR
from evaluation import metrics


def test_steps_of_integer_rescaled_continuous_and_constant_channels():
    rng = np.random.default_rng(0)
    mask = np.ones((40, 50), bool)
    integers = rng.integers(-300, 300, mask.shape).astype(np.float32)
    data = np.stack([integers, 0.25 * integers + 7.0, rng.normal(0, 1, mask.shape), np.full(mask.shape, 3.0)])
    steps = quantization_steps(data.astype(np.float32), mask)
    assert steps[0] == 1.0
    assert steps[1] == pytest.approx(0.25)
    assert 0 < steps[2] < 1e-3  # 2000 continuous values: the closest two are far closer than the spread
    assert steps[3] == 0.0  # one level: no gap


def test_steps_only_look_inside_the_mask():
    data = np.zeros((1, 20, 20), np.float32)
    data[0, :10] = np.arange(200).reshape(10, 20) * 2.0  # even values inside
    data[0, 10:] = np.arange(200).reshape(10, 20) + 0.5  # a finer step outside
    mask = np.zeros((20, 20), bool)
    mask[:10] = True
    assert quantization_steps(data, mask)[0] == 2.0


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_the_m_step_adds_each_channels_floor_to_its_variances(covariance_type):
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(500, 2)))
    x[:, 1] = 0.0  # one level: its variance is the floor alone
    resp = torch.from_numpy(rng.dirichlet(np.ones(3), 500))
    floor = gmm.covariance_floor(1e-4, [0.0, 0.5])
    assert floor.tolist() == pytest.approx([1e-4, 1e-4 + 0.25 / 12])
    _, params = gmm.weighted_mstep(x, resp, covariance_type, floor)
    _, plain = gmm.weighted_mstep(x, resp, covariance_type, 1e-4)
    def diagonal(p):
        return p.covariances if covariance_type == "diag" else torch.diagonal(p.covariances, dim1=-2, dim2=-1)

    variances, plain_var = diagonal(params), diagonal(plain)
    assert torch.allclose(variances[:, 1], torch.full((3,), 1e-4 + 0.25 / 12, dtype=variances.dtype))
    assert torch.allclose(variances[:, 0], plain_var[:, 0])  # a continuous channel keeps reg_covar only


@pytest.mark.parametrize("method", ["em-gmm", "em-svgmm", "deepsvg"])
def test_segment_gives_no_class_less_than_one_step_of_an_integer_channel(method):
    rng = np.random.default_rng(2)
    truth = np.zeros((32, 32), int)
    truth[:, 16:] = 1
    first = rng.normal(0, 1, truth.shape) + 6.0 * truth
    second = np.round(rng.normal(0, 0.2, truth.shape) + 3 * truth)  # integers: each class almost on one level
    options = {"max_iter": 15, "min_iter": 5} if method == "deepsvg" else {}
    result = segment([first.astype(np.float32), second.astype(np.float32)], 2, method=method, seed=0, **options)
    variances = np.diagonal(np.asarray(result.covariances), axis1=-2, axis2=-1)
    assert (variances[:, 1] >= 1.0 / 12).all()  # step 1 in input units
    assert (variances[:, 1] < 1.0 / 12 + 0.1).all()  # the step's variance, not a spread of its own


def test_em_with_the_bias_field_keeps_the_floor():
    rng = np.random.default_rng(3)
    truth = np.zeros((24, 24, 24), int)
    truth[:, :, 12:] = 1
    ramp = np.linspace(0.8, 1.2, 24)[None, None, :]
    first = (100 + 40 * truth + rng.normal(0, 4, truth.shape)) * ramp
    second = np.round(50 + rng.normal(0, 0.2, truth.shape))  # almost all on one level
    result = segment([first.astype(np.float32), second.astype(np.float32)], 2, method="em-gmm", bias_field="auto",
                     seed=0)
    variances = np.diagonal(np.asarray(result.covariances), axis1=-2, axis2=-1)
    assert (variances[:, 1] >= 0.9 / 12).all()  # step 1, in corrected units (the field's gain is near 1)


@pytest.mark.parametrize("index", [14, 241])
def test_stress_cases_with_an_integer_low_variance_channel(index):
    """em-gmm shrank classes onto single levels of the integer channel here (Dice 0.13 and 0.75)."""
    case = stress_cases.make_case(index)
    assert case.spec.channel_mode == "lowvar" and case.spec.dtype == "int16"
    result = segment(case.channels, case.spec.n_classes, method="em-gmm", mask=case.mask, seed=0)
    dice, _ = metrics.matched_dice(result.labels[case.region].astype(np.int64), case.truth[case.region],
                                   case.spec.n_classes, identity_from_method=False)
    assert float(np.nanmean(dice)) > 0.95


def test_the_default_floor_is_reg_covar_on_continuous_data():
    rng = np.random.default_rng(4)
    data = rng.normal(size=(2, 30, 30)).astype(np.float32)
    steps = quantization_steps(data, np.ones((30, 30), bool))
    assert gmm.covariance_floor(REG_COVAR, steps).numpy() == pytest.approx([REG_COVAR] * 2, rel=1e-3)
