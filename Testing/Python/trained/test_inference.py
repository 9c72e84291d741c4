"""Trained-model inference (inference.py): the engine's one call, and model files of earlier versions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from synthetic_cohort import FAST, accuracy, cohort, synthetic_case

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
    # label_mrf="off": the network's output, the labels of that version (the default now relabels them)
    result = segment(list(image), 3, method=meta["method"], mask=mask, spacing=(1.0, 1.0), device="cpu",
                     seed=0, model=str(OLD_MODEL), covariance_type=meta["covariance_type"], label_mrf="off")
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
                           fine_tune=fine_tune, label_mrf="off")  # the labels of the fit itself
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


# ---------------------------------------------------------------- the model's grid and the model's labels

@pytest.fixture(scope="module")
def model_at_2mm(tmp_path_factory):
    """A 1-channel model trained on the synthetic cohort declared as 2 x 2 mm images."""
    from DeepGMMSegmentLib.trained.training import train

    images, masks, _ = cohort(10, n_channels=1)
    path = tmp_path_factory.mktemp("model2mm") / "model.pt"
    train(images, 3, masks=masks, spatial_dims=2, spacing=(2.0, 2.0), output=path, prior_means="auto", seed=0,
          **FAST)
    return path


def _finer(image, mask, truth, seed: int):
    """The case on a grid twice as fine (each pixel split in 2 x 2), with fresh noise of the same level per pixel."""
    rng = np.random.default_rng(seed)
    up = np.kron(image, np.ones((1, 2, 2), np.float32))
    up = up + rng.normal(0, 0.25, up.shape).astype(np.float32)
    return up, np.kron(mask, np.ones((2, 2), bool)), np.kron(truth, np.ones((2, 2), int))


def test_the_model_file_records_the_training_voxel_size(model_at_2mm, trained_model):
    from DeepGMMSegmentLib.trained import model_file

    assert model_file.load_model(model_at_2mm)[1]["spacing"] == [2.0, 2.0]
    assert model_file.load_model(trained_model[0])[1]["spacing"] is None  # trained without a voxel size
    assert "spacing" not in model_file.load_model(OLD_MODEL)[1]  # files of earlier versions lack it
    described = model_file.format_description(model_file.describe_model(model_at_2mm))
    assert "training voxel size: 2 x 2 (finer images are segmented on this grid)" in described
    assert "training voxel size" not in model_file.format_description(model_file.describe_model(OLD_MODEL))


def test_model_grid_factors_bring_a_finer_image_to_the_training_voxel_size():
    from DeepGMMSegmentLib.trained.inference import model_grid_factors

    meta3d = {"spacing": [2.0, 2.0, 2.0], "network": {"spatial_dims": 3}}
    assert model_grid_factors(meta3d, (1.0, 1.0, 1.0), 3) == (2, 2, 2)
    assert model_grid_factors(meta3d, (2.0, 0.7, 1.1), 3) == (1, 3, 2)  # the nearest whole ratio per axis
    assert model_grid_factors(meta3d, (3.0, 2.5, 2.0), 3) == (1, 1, 1)  # coarser: nothing to pool
    assert model_grid_factors(meta3d, None, 3) == (1, 1, 1)  # the image's voxel size unknown
    assert model_grid_factors({"network": {"spatial_dims": 3}}, (1.0, 1.0, 1.0), 3) == (1, 1, 1)  # older files
    slices = {"spacing": [4.0, 2.0, 2.0], "network": {"spatial_dims": 2}}
    assert model_grid_factors(slices, (1.0, 1.0, 1.0), 3) == (1, 2, 2)  # a 2D network keeps every slice


def test_a_finer_image_is_segmented_on_the_models_grid(model_at_2mm, monkeypatch):
    """The forward pass sees the image averaged to the training voxel size; the labels cover every fine pixel."""
    from DeepGMMSegmentLib import segment
    from DeepGMMSegmentLib.core.inputs import crop_box
    from DeepGMMSegmentLib.trained import inference

    seen = []
    forward = inference.forward_logits

    def spy(network, x, dims):
        seen.append(tuple(x.shape[1:]))
        return forward(network, x, dims)

    monkeypatch.setattr(inference, "forward_logits", spy)
    scores = {}
    for seed in (201, 202, 203):
        fine, mask, truth = _finer(*synthetic_case(seed), seed=seed)
        box = tuple(s.stop - s.start for s in crop_box(torch.from_numpy(mask)))  # what the network sees
        for spacing in ((1.0, 1.0), (2.0, 2.0)):
            seen.clear()
            result = segment(list(fine), 3, method="deepsvg", mask=mask, spacing=spacing, device="cpu", seed=0,
                             model=str(model_at_2mm))
            assert result.labels.shape == mask.shape
            # at 1 mm the network ran on 2 x 2 blocks of the mask's box; declared 2 mm, on the box itself
            assert seen == ([tuple(-(-n // 2) for n in box)] if spacing == (1.0, 1.0) else [box])
            scores.setdefault(spacing, []).append(accuracy(result.labels, truth, mask))
    # on a quarter of the pixels the network's probabilities, lifted back, label the fine images as well as
    # a pass over every pixel (a misplaced lift would shift every boundary)
    assert min(scores[(1.0, 1.0)]) > 0.95
    assert np.mean(scores[(1.0, 1.0)]) > np.mean(scores[(2.0, 2.0)]) - 0.005


def test_a_deepsvg_models_labels_are_its_posterior_under_the_potts_prior(trained_model):
    """Default: the fitted model's posterior with neighbours (label_mrf); "off": the network's output as before."""
    from DeepGMMSegmentLib import segment

    path, _ = trained_model
    gains = []
    for seed in (301, 302, 303, 304):
        image, mask, truth = synthetic_case(seed, n_channels=2, noise=0.45)
        off = segment(list(image), 3, method="deepsvg", mask=mask, device="cpu", seed=0, model=str(path),
                      label_mrf="off")
        network = np.zeros(mask.shape, np.uint8)
        network[mask] = off.probabilities[:, mask].argmax(0) + 1
        np.testing.assert_array_equal(off.labels, network)
        default = segment(list(image), 3, method="deepsvg", mask=mask, device="cpu", seed=0, model=str(path))
        np.testing.assert_allclose(default.means, off.means)  # the same fitted mixture, relabelled
        gains.append(accuracy(default.labels, truth, mask) - accuracy(off.labels, truth, mask))
    assert np.mean(gains) > 0 and min(gains) > -0.01
