"""Trained-model inference (inference.py): the engine's one call, and model files of earlier versions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from synthetic_cohort import synthetic_case

DATA = Path(__file__).resolve().parent / "data"
# Written by deepgmm-train at commit a001102 (before issue 13), with the labels `deepgmm-segment
# --model` gave for synthetic case 1 at that commit.
OLD_MODEL = DATA / "model_format1_a001102.pt"
OLD_LABELS = DATA / "model_format1_a001102_case01_labels.npy"


def test_a_model_file_of_the_previous_version_loads_and_segments_as_it_did():
    from DeepGMMSegmentLib import segment
    from DeepGMMSegmentLib.trained import model_file

    state, meta = model_file.load_model(OLD_MODEL)
    assert meta["format_version"] == 1 and meta["channel_names"] == ["T1", "T2"] and state
    image, mask, _ = synthetic_case(1, n_channels=2)
    result = segment(list(image), 3, method=meta["method"], mask=mask, spacing=(1.0, 1.0), device="cpu",
                     seed=0, model=str(OLD_MODEL), covariance_type=meta["covariance_type"])
    np.testing.assert_array_equal(result.labels, np.load(OLD_LABELS))


def test_fit_with_model_is_the_engines_model_branch(trained_model):
    """One call gives what segment(model=...) computes today: same responsibilities, mixture and history."""
    from DeepGMMSegmentLib import segment
    from DeepGMMSegmentLib.trained.inference import fit_with_model
    from DeepGMMSegmentLib.core.inputs import normalize_channels, validate_inputs

    path, _ = trained_model
    image, mask, _ = synthetic_case(105, n_channels=2)
    for fine_tune in (0, 3):
        expected = segment(list(image), 3, method="deepsvg", mask=mask, device="cpu", seed=0, model=str(path),
                           fine_tune=fine_tune)
        data, m = validate_inputs(list(image), 3, "deepsvg", mask)
        norm, centre, scale = normalize_channels(data, m)
        seen = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            fit = fit_with_model(torch.from_numpy(norm), torch.from_numpy(m), path, fine_tune, torch.device("cpu"),
                                 0, lambda i, n, nll: seen.append((i, n)))
        assert fit.n_iter == expected.n_iter == max(fine_tune, 1)
        np.testing.assert_allclose(fit.nll_history, expected.nll_history, rtol=1e-6)
        labels = np.zeros(m.shape, np.uint8)
        labels[m] = fit.log_resp.argmax(1).numpy() + 1  # the model was trained with prior means: fixed order
        np.testing.assert_array_equal(labels, expected.labels)
        means = fit.params.means.double().numpy() * scale + centre
        np.testing.assert_allclose(means, expected.means, rtol=1e-5, atol=1e-5)
        assert seen[-1] == (max(fine_tune, 1), max(fine_tune, 1))


def test_fit_with_model_cancels_through_its_report(trained_model):
    import pytest

    from DeepGMMSegmentLib.trained.inference import fit_with_model
    from DeepGMMSegmentLib.result import SegmentationCancelled

    path, _ = trained_model
    image, mask, _ = synthetic_case(106, n_channels=2)
    x = torch.from_numpy(((image - image[:, mask].mean(1)[:, None, None]) / image[:, mask].std(1)[:, None, None]))
    with pytest.raises(SegmentationCancelled):
        fit_with_model(x * torch.from_numpy(mask), torch.from_numpy(mask), path, 5, torch.device("cpu"), 0,
                       lambda i, n, nll: i < 2)
