"""Every bad input gets a ValueError that names the problem and the fix; device handling."""

import numpy as np
import pytest
import torch

from DeepGMMSegmentLib import engine, segment
from DeepGMMSegmentLib.core.inputs import resolve_device


@pytest.fixture
def img():
    return np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(channels=[np.zeros((16, 16)) + np.arange(16), np.ones((8, 8))]), r"Channel 2 has shape \(8, 8\).*resample"),
        (dict(channels=np.ones((2, 2, 2, 2))), r"4 dimensions.*2D .* or 3D"),
        (dict(channels=[]), "No channels"),
        (dict(channels="image.nii"), "must be an array"),
        (dict(channels=np.full((16, 16), 3.0)), r"Channel 1 is constant inside the mask.*remove it"),
        (dict(n_classes=1), "at least 2"),
        (dict(n_classes=2.5), "integer"),
        (dict(method="kmeans"), r"Unknown method 'kmeans'.*deepsvg, deepg, em-gmm, em-svgmm"),
        (dict(device="tpu"), r"Unknown device 'tpu'.*'auto', 'cpu'"),
        (dict(mask=np.zeros((16, 16), bool)), "mask is empty"),
        (dict(mask=np.ones((4, 4), bool)), r"mask has shape \(4, 4\)"),
        (dict(colour="red"), r"Unknown option\(s\) colour.*valid options"),
        (dict(covariance_type="tied"), "covariance_type must be one of 'full', 'diag', got 'tied'"),
        (dict(prior_means=[[1.0, 2.0]]), r"prior_means must be a finite \(3, 1\) array"),
        (dict(spacing=(1.0, -1.0)), "spacing must be 2 positive numbers"),
        (dict(method="em-gmm", model="m.pt"), "only be used with the deep methods"),
    ],
)
def test_bad_input_is_a_clear_value_error(img, kwargs, match):
    args = dict(channels=img, n_classes=3, method="em-gmm")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        segment(args.pop("channels"), args.pop("n_classes"), **args)


def test_nan_and_inf_are_rejected_with_a_count(img):
    bad = img.copy()
    bad[0, :3] = np.nan
    bad[1, 0] = np.inf
    with pytest.raises(ValueError, match=r"Channel 1 has 4 NaN or infinite values.*nan_to_num"):
        segment(bad, 2, method="em-gmm")
    # outside the mask they do no harm
    mask = np.ones_like(img, bool)
    mask[:2] = False
    assert segment(bad, 2, method="em-gmm", mask=mask).labels[0, 0] == 0


def test_more_classes_than_distinct_values(img):
    two = (img > 0).astype(np.float32)
    with pytest.raises(ValueError, match=r"Only 2 distinct intensity values.*n_classes <= 2"):
        segment(two, 3, method="em-gmm")


def test_inputs_are_not_modified(img):
    mask = img > -1
    before, mask_before = img.copy(), mask.copy()
    for method, options in (("em-gmm", {}), ("deepsvg", dict(max_iter=2, min_iter=2, warm_start_iter=1))):
        segment(img, 3, method=method, mask=mask, **options)  # the bool mask is used without a copy
        np.testing.assert_array_equal(img, before)
        np.testing.assert_array_equal(mask, mask_before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error(img):
    with pytest.raises(ValueError, match=r"no CUDA GPU is available.*device='auto' or 'cpu'"):
        segment(img, 2, method="em-gmm", device="cuda")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        segment(img, 2, method="em-gmm", device="cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto must pick the CPU here")
def test_auto_falls_back_to_cpu(img):
    assert segment(img, 2, method="em-gmm", device="auto").device == "cpu"
    assert resolve_device("AUTO") == torch.device("cpu")


def test_cuda_out_of_memory_under_auto_retries_on_cpu(img, monkeypatch):
    # No GPU here: stand in for a GPU whose first attempt runs out of memory. The retry is real.
    real_run = engine._run
    monkeypatch.setattr(engine, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def run(data, m, k, method, opts, spacing, prior, dev, *rest):
        if dev.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(data, m, k, method, opts, spacing, prior, dev, *rest)

    monkeypatch.setattr(engine, "_run", run)
    with pytest.warns(RuntimeWarning, match="retrying on the CPU"):
        result = segment(img, 2, method="em-gmm", device="auto")
    assert result.device == "cpu"
    assert any("out of memory" in note for note in result.notes)
    with pytest.raises(torch.OutOfMemoryError):
        segment(img, 2, method="em-gmm", device="cuda")


def test_mask_values_gather_and_scatter_like_boolean_indexing():
    from DeepGMMSegmentLib.core.inputs import mask_values, set_mask_values

    rng = np.random.default_rng(3)
    data = rng.normal(size=(2, 6, 7, 5)).astype(np.float32)
    mask = rng.random((6, 7, 5)) > 0.4
    np.testing.assert_array_equal(mask_values(data, mask), data[:, mask])
    out = np.zeros_like(data)
    set_mask_values(out, mask, data[:, mask] * 2)
    expected = np.zeros_like(data)
    expected[:, mask] = data[:, mask] * 2
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("chunk", [1 << 18, 7])  # one block; blocks of 7 grid voxels, some outside the mask
def test_probability_maps_follow_the_class_order_and_sum_to_one(chunk):
    import torch

    from DeepGMMSegmentLib.engine import _probability_maps

    rng = np.random.default_rng(4)
    mask = rng.random((5, 6, 4)) > 0.3
    logits = torch.from_numpy(rng.normal(size=(int(mask.sum()), 4)).astype(np.float32))
    logits[:7, 1] = logits[:7, 3] = 9.0  # ties: the first class of the new order wins
    log_resp = torch.log_softmax(logits, dim=1)
    order = np.array([2, 0, 3, 1])
    probabilities, labels = _probability_maps(log_resp, order, mask, chunk)
    resp = log_resp.exp().numpy()[:, order]
    resp /= resp.sum(1, keepdims=True)
    np.testing.assert_array_equal(probabilities[:, mask].T, resp)
    assert (probabilities[:, ~mask] == 0).all() and (labels[~mask] == 0).all()
    np.testing.assert_array_equal(labels[mask], resp.argmax(1) + 1)
    assert (labels[mask][:7] == 3).all()  # tied old classes 3 and 1 are labels 3 and 4: the first wins
