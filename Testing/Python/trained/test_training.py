"""train(), model files and one-pass inference / fine-tuning on a tiny synthetic cohort (real torch, real files)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from synthetic_cohort import FAST, accuracy, cohort, synthetic_case


def _normalised(seed: int, n_channels: int = 2):
    from DeepGMMSegmentLib.core.inputs import normalize_channels

    image, mask, truth = synthetic_case(seed, n_channels=n_channels)
    x, _, _ = normalize_channels(image, mask)
    return torch.from_numpy(x), torch.from_numpy(mask), truth


@pytest.mark.cuda
def test_trained_model_segments_new_cases_in_one_forward_pass(trained_model, compute_device):
    from DeepGMMSegmentLib import segment

    path, result = trained_model
    for seed in (100, 101, 102):  # cases never seen in training
        image, mask, truth = synthetic_case(seed, n_channels=2)
        segmented = segment(list(image), 3, method="deepsvg", mask=mask, model=str(path), device=compute_device)
        assert accuracy(segmented.labels, truth, mask) > 0.9
        assert (segmented.labels[~mask] == 0).all()
        # One forward pass: no per-image optimisation steps.
        assert segmented.n_iter == 1
    tuned = segment(list(image), 3, method="deepsvg", mask=mask, model=str(path), fine_tune=4, device=compute_device)
    assert tuned.n_iter == 4  # fine-tuning steps are the iterations, nothing more
    # The model beats its own first epoch on the held-out cases (it learnt something).
    history = result.metadata["training"]["val_loss_history"]
    assert min(history) < history[0]


def test_model_file_round_trip_keeps_weights_and_metadata(trained_model):
    from DeepGMMSegmentLib.trained import model_file

    path, result = trained_model
    state, meta = model_file.load_model(path)
    for name, tensor in result.network.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    assert meta == result.metadata
    assert meta["n_classes"] == 3 and meta["n_channels"] == 2 and meta["channel_names"] == ["T1", "T2"]
    assert meta["spatial_dims"] == 2 and meta["method"] == "deepsvg"
    assert meta["network"] == {"class": "UNet", **result.network.config}
    assert meta["normalization"]["kind"] == "zscore-in-mask"
    assert np.asarray(meta["prior_means"]).shape == (3, 2)
    training = meta["training"]
    assert (training["n_train"], training["n_val"], training["epochs"]) == (8, 2, 12)
    assert training["best_epoch"] == int(np.argmin(training["val_loss_history"])) + 1
    assert training["status"] == "max_epochs"

    info = model_file.describe_model(path)
    assert info["n_parameters"] == sum(t.numel() for t in state.values())
    assert info["training"]["train_loss_history"] == "12 values"
    text = model_file.format_description(info)
    assert "channels (2): T1, T2" in text and "classes: 3" in text


@pytest.mark.cuda
def test_fine_tuning_lowers_the_nll_of_the_one_pass_prediction(trained_model, compute_device):
    from DeepGMMSegmentLib.trained.training import predict_with_model

    path, _ = trained_model
    x, mask, _ = _normalised(103)
    seen = []
    device = torch.device(compute_device)
    x, mask = x.to(device), mask.to(device)  # predict_with_model takes its inputs on the device
    log_resp0, history0 = predict_with_model(x, mask, path, 0, device, 0)
    log_resp, history = predict_with_model(x, mask, path, 15, device, 0,
                                           progress=lambda i, n, nll: seen.append((i, n)) or True)
    assert len(history0) == 1
    assert history[0] == pytest.approx(history0[0], rel=1e-4)  # starts from the trained weights
    assert history[-1] < history0[0] - 1e-3
    assert seen[-1] == (15, 15)
    assert log_resp.shape == (3, 32, 32)
    probabilities = log_resp.cpu().exp()
    torch.testing.assert_close(probabilities.sum(0), torch.ones(32, 32))


def test_cancel_during_fine_tuning_raises(trained_model):
    from DeepGMMSegmentLib import SegmentationCancelled
    from DeepGMMSegmentLib.trained.training import predict_with_model

    path, _ = trained_model
    x, mask, _ = _normalised(104)
    with pytest.raises(SegmentationCancelled):
        predict_with_model(x, mask, path, 10, torch.device("cpu"), 0, progress=lambda i, n, nll: i < 3)


def test_mismatching_inputs_are_refused_with_a_clear_message(trained_model):
    from DeepGMMSegmentLib import segment
    from DeepGMMSegmentLib.trained import model_file

    path, _ = trained_model
    image, mask, _ = synthetic_case(105, n_channels=2)
    with pytest.raises(ValueError, match=r"expects 2 channel\(s\) \(T1, T2\) but the input has 1"):
        segment(image[0], 3, mask=mask, model=str(path), device="cpu")
    volume = np.stack([image[0]] * 4)
    with pytest.raises(ValueError, match="trained on 2D images but the input is 3D"):
        segment([volume, volume], 3, mask=np.stack([mask] * 4), model=str(path), device="cpu")
    _, meta = model_file.load_model(path)
    with pytest.raises(ValueError, match="different order"):
        model_file.check_compatible(meta, 2, 2, channel_names=["t2", "t1"])
    with pytest.raises(ValueError, match="channel names differ"):
        model_file.check_compatible(meta, 2, 2, channel_names=["FLAIR", "T1"])
    with pytest.raises(ValueError, match="segments into 3 classes but 4 were requested"):
        model_file.check_compatible(meta, 2, 2, n_classes=4)
    model_file.check_compatible(meta, 2, 2, channel_names=["T1", "T2"], n_classes=3)  # a match passes
    model_file.check_compatible(meta, 2, 2, channel_names=["channel1", "channel2"])  # placeholders are not compared


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        # A real attack would run a shell command; touching a file shows whether code ran.
        return (open, (str(self.marker), "w"))


def test_model_file_with_pickled_code_is_refused_without_running_it(tmp_path, trained_model):
    from DeepGMMSegmentLib import segment
    from DeepGMMSegmentLib.trained import model_file

    marker = tmp_path / "code-was-executed"
    good_path, _ = trained_model
    state, meta = model_file.load_model(good_path)
    evil = tmp_path / "evil.pt"
    import json

    torch.save({"format": "deepgmm-model", "format_version": 1, "metadata_json": json.dumps(meta),
                "state_dict": state, "extra": _RunsCodeWhenUnpickled(marker)}, evil)
    # Sanity: an unrestricted unpickler would run the payload.
    pickle.loads(pickle.dumps(_RunsCodeWhenUnpickled(tmp_path / "probe"))).close()
    assert (tmp_path / "probe").exists()

    with pytest.raises(ValueError, match="Refusing to load"):
        model_file.load_model(evil)
    with pytest.raises(ValueError, match="Refusing to load"):
        segment(synthetic_case(1, n_channels=2)[0].tolist(), 3, model=str(evil), device="cpu")
    assert not marker.exists()


def test_files_that_are_not_models_are_refused(tmp_path):
    from DeepGMMSegmentLib.trained import model_file

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a model")
    with pytest.raises(ValueError, match=r"not a DeepGMMSegment model file \(not a PyTorch archive\)") as refused:
        model_file.load_model(garbage)
    assert "execute code" not in str(refused.value)  # a text file is not a security problem, just the wrong file
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, plain)
    with pytest.raises(ValueError, match="not a DeepGMMSegment model"):
        model_file.load_model(plain)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "deepgmm-model", "format_version": 99, "metadata_json": "{}", "state_dict": {}}, newer)
    with pytest.raises(ValueError, match="format version 99"):
        model_file.load_model(newer)
    with pytest.raises(ValueError, match="does not exist"):
        model_file.load_model(tmp_path / "missing.pt")


def test_a_model_is_saved_even_when_early_stopping_never_fires_and_on_cancel(tmp_path):
    from DeepGMMSegmentLib.trained import model_file
    from DeepGMMSegmentLib.trained.training import TrainingCancelled, train

    images, masks, _ = cohort(5)
    settings = dict(FAST, max_epochs=2, min_epochs=2, warm_start_steps=2)
    path = tmp_path / "short.pt"
    train(images, 3, masks=masks, spatial_dims=2, output=path, **settings)
    assert model_file.load_model(path)[1]["training"]["status"] == "max_epochs"

    cancelled = tmp_path / "cancelled.pt"
    stop_after_epoch_2 = lambda info: not (info.end_of_epoch and info.epoch == 2)  # noqa: E731
    with pytest.raises(TrainingCancelled):
        train(images, 3, masks=masks, spatial_dims=2, output=cancelled, progress=stop_after_epoch_2,
              **dict(settings, max_epochs=5))
    meta = model_file.load_model(cancelled)[1]
    assert meta["training"]["status"] == "interrupted at epoch 2"
    assert meta["training"]["epochs"] == 2


def test_training_is_reproducible_and_leaves_inputs_untouched():
    from DeepGMMSegmentLib.trained.training import train

    images, masks, _ = cohort(4)
    before = [i.copy() for i in images]
    settings = dict(FAST, max_epochs=2, min_epochs=2, warm_start_steps=2)
    a = train(images, 3, masks=masks, spatial_dims=2, seed=3, **settings)
    b = train(images, 3, masks=masks, spatial_dims=2, seed=3, **settings)
    for name, tensor in a.network.state_dict().items():
        torch.testing.assert_close(b.network.state_dict()[name], tensor, rtol=0, atol=0)
    assert a.history == [dict(h, seconds=a.history[i]["seconds"]) for i, h in enumerate(b.history)]
    for original, image in zip(before, images):
        np.testing.assert_array_equal(original, image)


def test_prior_means_fix_which_output_is_which_class():
    """With prior means in reverse order (class 1 = brightest), output 1 must be the bright disc."""
    from DeepGMMSegmentLib.core.inputs import normalize_channels
    from DeepGMMSegmentLib.trained.training import forward_log_resp, pooled_class_means, train, _prepare_cases

    images, masks, _ = cohort(6)
    cases, _, _ = _prepare_cases(images, masks, 3, "deepsvg", 2)
    reversed_prior = pooled_class_means(cases, 3)[::-1].copy()
    result = train(images, 3, masks=masks, spatial_dims=2, prior_means=reversed_prior, prior_weight=1.0,
                   **dict(FAST, max_epochs=6, min_epochs=6))
    image, mask, truth = synthetic_case(110)
    x, _, _ = normalize_channels(image, mask)
    with torch.no_grad():
        labels = forward_log_resp(result.network, torch.from_numpy(x), 2).argmax(0).numpy()
    assert (labels[mask] == 2 - truth[mask]).mean() > 0.85


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t, i, m: t([i[0][0][None].repeat(3, 0)], 3), "ambiguous"),
        (lambda t, i, m: t([i[0], np.concatenate([i[1], i[1]])], 3, spatial_dims=2), "same channels"),
        (lambda t, i, m: t(i[:2], 3, method="em-gmm", spatial_dims=2), "Only the deep methods"),
        (lambda t, i, m: t(i[:2], 3, spatial_dims=2, prior_means=np.zeros((2, 1))), r"\(3, 1\) array"),
        (lambda t, i, m: t(i[:2], 3, masks=m[:1], spatial_dims=2), "one mask"),
        (lambda t, i, m: t(i[:2], 3, masks=[m[0], np.zeros_like(m[1])], spatial_dims=2), "Training case 2: The mask is empty"),
        (lambda t, i, m: t([], 3), "No training images"),
        (lambda t, i, m: t("cases/", 3), "deepgmm-train"),
    ],
)
def test_bad_training_input_is_refused(call, message):
    from DeepGMMSegmentLib.trained.training import train

    images, masks, _ = cohort(2)
    with pytest.raises(ValueError, match=message):
        call(train, images, masks)


def test_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from DeepGMMSegmentLib.trained.training import train

    images, masks, _ = cohort(2)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        train(images, 3, masks=masks, spatial_dims=2, device="cuda", max_epochs=1)


def test_check_model_request_names_a_class_count_mismatch(trained_model):
    from DeepGMMSegmentLib.trained.training import check_model_request

    path, _ = trained_model
    assert check_model_request(path, 3, 2, 2)["n_classes"] == 3
    with pytest.raises(ValueError, match="segments into 3 classes but 4 were requested"):
        check_model_request(path, 4, 2, 2)


def test_segment_with_a_model_checks_the_class_count_first(trained_model):
    from DeepGMMSegmentLib import segment

    path, _ = trained_model
    image, mask, _ = synthetic_case(300, n_channels=2)
    with pytest.raises(ValueError, match="segments into 3 classes but 4 were requested"):
        segment(list(image), 4, method="deepsvg", mask=mask, model=path)


def test_segment_keeps_the_class_order_of_a_model_trained_with_prior_means(tmp_path):
    """A model trained with reversed prior means outputs class 1 = brightest; segment() must not re-sort it."""
    from DeepGMMSegmentLib import segment
    from DeepGMMSegmentLib.trained.training import _prepare_cases, pooled_class_means, train

    images, masks, _ = cohort(6)
    cases, _, _ = _prepare_cases(images, masks, 3, "deepsvg", 2)
    reversed_prior = pooled_class_means(cases, 3)[::-1].copy()
    path = tmp_path / "reversed.pt"
    train(images, 3, masks=masks, spatial_dims=2, prior_means=reversed_prior, prior_weight=1.0, output=path,
          **dict(FAST, max_epochs=6, min_epochs=6))
    image, mask, truth = synthetic_case(111)
    result = segment(image[0], 3, method="deepsvg", mask=mask, model=path)
    assert np.all(np.diff(result.means[:, 0]) < 0)  # brightest first, as trained
    assert (result.labels[mask].astype(int) - 1 == 2 - truth[mask]).mean() > 0.85


def test_class_names_are_stored_in_the_model_and_returned_with_its_segmentation(tmp_path):
    from DeepGMMSegmentLib import segment
    from DeepGMMSegmentLib.trained import model_file
    from DeepGMMSegmentLib.trained.training import train

    images, masks, _ = cohort(3)
    path = tmp_path / "named.pt"
    train(images, 3, masks=masks, spatial_dims=2, output=path, class_names=[" dark", "middle ", "bright"],
          **dict(FAST, max_epochs=1, min_epochs=1))
    info = model_file.describe_model(path)
    assert info["class_names"] == ["dark", "middle", "bright"]
    assert "class names: dark, middle, bright" in model_file.format_description(info)
    image, mask, _ = synthetic_case(112)
    assert segment(image[0], 3, method="deepsvg", mask=mask, model=path).class_names == ["dark", "middle", "bright"]
    assert segment(image[0], 3, method="em-gmm", mask=mask).class_names is None


@pytest.mark.parametrize("names, message", [(["a", "b"], "must be 3 non-empty names"),
                                            (["a", "", "c"], "must be 3 non-empty names"),
                                            (["a", "B", "b"], "repeat a name")])
def test_bad_class_names_are_refused_before_training(names, message):
    from DeepGMMSegmentLib.trained.training import train

    images, masks, _ = cohort(2)
    with pytest.raises(ValueError, match=message):
        train(images, 3, masks=masks, spatial_dims=2, class_names=names, max_epochs=1)
