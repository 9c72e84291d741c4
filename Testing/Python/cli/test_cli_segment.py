"""deepgmm-segment on real files: geometry kept, resampling, mask, preview, console script."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepGMMSegmentLib.cli import segment as segment_cli
from DeepGMMSegmentLib.cli.preview import OVERLAY_ALPHA, class_colors

from cli_phantoms import DIRECTION, ORIGIN, SPACING, make_image, phantom_truth

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "data" / "sample"


def run_cli(capsys, *arguments) -> tuple[int, str]:
    code = segment_cli.main([str(a) for a in arguments])
    return code, capsys.readouterr().err


def assert_geometry(image: sitk.Image, spacing=SPACING, origin=ORIGIN, direction=DIRECTION):
    # NIfTI stores geometry in float32: compare with a tolerance well below any real difference.
    np.testing.assert_allclose(image.GetSpacing(), spacing, rtol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-5)
    np.testing.assert_allclose(image.GetDirection(), direction, atol=1e-6)


def accuracy(labels: np.ndarray, truth: np.ndarray, where: np.ndarray | None = None) -> float:
    where = np.ones(truth.shape, bool) if where is None else where
    return float((labels[where] == truth[where]).mean())


@pytest.mark.parametrize("label_name, probability_name",
                         [("labels.nii.gz", "probabilities.nrrd"),
                          ("labels.nrrd", "probabilities.mha")])
def test_round_trip_keeps_geometry_of_first_channel(phantom, capsys, label_name,
                                                    probability_name):
    out = phantom["dir"]
    code, err = run_cli(capsys, phantom["channel_path"], "--classes", 3, "--method", "em-gmm",
                        "--output", out / label_name, "--probabilities", out / probability_name)
    assert code == 0, err

    labels = sitk.ReadImage(str(out / label_name))
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert labels.GetSize() == tuple(reversed(phantom["truth"].shape))
    assert_geometry(labels)
    label_array = sitk.GetArrayFromImage(labels)
    # Classes ascend with the mean intensity, so they match the phantom's numbering directly.
    assert accuracy(label_array, phantom["truth"]) > 0.97

    probabilities = sitk.ReadImage(str(out / probability_name))
    assert probabilities.GetNumberOfComponentsPerPixel() == 3
    assert probabilities.GetPixelID() == sitk.sitkVectorFloat32
    assert_geometry(probabilities)
    probability_array = sitk.GetArrayFromImage(probabilities)  # (z, y, x, K)
    np.testing.assert_allclose(probability_array.sum(axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probability_array.argmax(axis=-1) + 1, label_array)
    # The summary names the method and the classes; no staging directory is left behind.
    assert "em-gmm on cpu" in err and "class 3" in err
    assert not [p for p in os.listdir(out) if p.startswith(".deepgmm-segment")]


def test_mask_limits_the_segmentation(phantom, capsys):
    out = phantom["dir"]
    code, err = run_cli(capsys, phantom["channel_path"], "-k", "3", "-m", "em-gmm",
                        "--mask", phantom["mask_path"], "-o", out / "labels.nii.gz",
                        "-p", out / "probabilities.nii.gz")
    assert code == 0, err
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nii.gz")))
    mask = phantom["mask"]
    assert (labels[~mask] == 0).all()
    assert (labels[mask] > 0).all()
    assert accuracy(labels, phantom["truth"], mask) > 0.97
    probabilities = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "probabilities.nii.gz")))
    assert (probabilities[~mask] == 0).all()
    np.testing.assert_allclose(probabilities[mask].sum(axis=-1), 1.0, atol=1e-5)


def test_mask_on_another_grid_is_resampled_nearest_neighbour(phantom, capsys):
    out = phantom["dir"]
    fine = sitk.ReadImage(str(phantom["mask_path"]))
    # The same physical region on a grid with twice the spacing in x and y, shifted by 0.3 mm.
    coarse_reference = sitk.Image([13, 11, 10], sitk.sitkUInt8)
    coarse_reference.SetSpacing((1.6, 2.2, 2.5))
    coarse_reference.SetOrigin(tuple(o + 0.3 for o in ORIGIN))
    coarse_reference.SetDirection(DIRECTION)
    coarse = sitk.Resample(fine, coarse_reference, sitk.Transform(), sitk.sitkNearestNeighbor)
    coarse = coarse * 5  # any non-zero value marks "inside"
    sitk.WriteImage(coarse, str(out / "coarse_mask.nrrd"))
    expected = sitk.GetArrayFromImage(sitk.Resample(
        coarse, fine, sitk.Transform(), sitk.sitkNearestNeighbor)) != 0

    code, err = run_cli(capsys, phantom["channel_path"], "-k", "3", "-m", "em-gmm",
                        "--mask", out / "coarse_mask.nrrd", "-o", out / "labels.nii.gz")
    assert code == 0, err
    assert "resampled mask" in err and "nearest neighbour" in err
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nii.gz")))
    np.testing.assert_array_equal(labels > 0, expected)


def two_channel_phantom(tmp_path: Path, coverage_fraction: float = 1.0):
    """Channel 1 separates class 1 from 2/3 only weakly; channel 2 (on a coarser, shifted grid)
    separates 2 from 3. Only a correct resampling of channel 2 gives a good segmentation."""
    rng = np.random.default_rng(3)
    truth = phantom_truth()
    channel_1 = np.array([0, 20, 60, 64], np.float32)[truth]
    channel_1 += rng.normal(0, 2.0, truth.shape).astype(np.float32)
    sitk.WriteImage(make_image(channel_1), str(tmp_path / "c1.nii.gz"))
    # Channel 2 is defined in physical space: sample a fine, noise-free version on its own grid.
    fine = make_image(np.array([0, 50, 90, 10], np.float32)[truth])
    coarse_reference = sitk.Image([18, int(np.ceil(15 * coverage_fraction)), 10],
                                  sitk.sitkFloat32)
    coarse_reference.SetSpacing((SPACING[0] * 1.5, SPACING[1] * 1.5, SPACING[2]))
    coarse_reference.SetOrigin(fine.TransformContinuousIndexToPhysicalPoint((-0.25, -0.25, 0)))
    coarse_reference.SetDirection(DIRECTION)
    channel_2 = sitk.Resample(fine, coarse_reference, sitk.Transform(), sitk.sitkNearestNeighbor)
    sitk.WriteImage(channel_2, str(tmp_path / "c2.mha"))
    return truth


def test_second_channel_on_another_grid_is_resampled_onto_the_first(tmp_path, capsys):
    truth = two_channel_phantom(tmp_path)
    code, err = run_cli(capsys, tmp_path / "c1.nii.gz", tmp_path / "c2.mha", "-k", "3",
                        "-m", "em-gmm", "-o", tmp_path / "labels.nrrd",
                        "-p", tmp_path / "probabilities.nrrd")
    assert code == 0, err
    assert "resampled channel 2" in err and "linear" in err
    labels_image = sitk.ReadImage(str(tmp_path / "labels.nrrd"))
    assert_geometry(labels_image)
    assert labels_image.GetSize() == tuple(reversed(truth.shape))
    labels = sitk.GetArrayFromImage(labels_image)
    # Interpolated boundary voxels may go either way; the interior must be right.
    assert accuracy(labels, truth) > 0.9
    assert_geometry(sitk.ReadImage(str(tmp_path / "probabilities.nrrd")))


def test_channel_covering_part_of_the_first_leaves_the_rest_unsegmented(tmp_path, capsys):
    two_channel_phantom(tmp_path, coverage_fraction=0.6)
    code, err = run_cli(capsys, tmp_path / "c1.nii.gz", tmp_path / "c2.mha", "-k", "3",
                        "-m", "em-gmm", "-o", tmp_path / "labels.nii.gz")
    assert code == 0, err
    assert "covers only" in err
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels.nii.gz")))
    assert (labels == 0).any() and (labels > 0).any()
    # Unsegmented voxels are those far along y (beyond channel 2's extent).
    assert (labels[:, :5, :] > 0).all()
    assert (labels[:, -3:, :] == 0).all()


def colour_fractions(rgb: np.ndarray, n_classes: int) -> list[float]:
    """Fraction of pixels whose colour is class k's colour blended over a grey value."""
    pixels = rgb.reshape(-1, 3).astype(np.float64)
    fractions = []
    for colour in class_colors(n_classes):
        grey = (pixels - OVERLAY_ALPHA * 255.0 * np.asarray(colour)) / (1.0 - OVERLAY_ALPHA)
        is_blend = (np.ptp(grey, axis=1) <= 3.0) & (grey.min(axis=1) >= -2) \
            & (grey.max(axis=1) <= 257)
        fractions.append(float(is_blend.mean()))
    return fractions


def test_preview_of_3d_volume_shows_three_views_in_the_class_colours(
        phantom, capsys, png_decoder):
    out = phantom["dir"]
    code, err = run_cli(capsys, phantom["channel_path"], "-k", "3", "-m", "em-gmm",
                        "--mask", phantom["mask_path"], "-o", out / "labels.nii.gz",
                        "--preview", out / "preview.png")
    assert code == 0, err
    rgb = png_decoder((out / "preview.png").read_bytes())
    assert rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.std() > 10, "preview is blank"
    # Every class colour shows up, and a fair part of the image is overlay.
    fractions = colour_fractions(rgb, 3)
    assert min(fractions) > 0.005, fractions
    # Three views side by side: more than twice as wide as any single view's height.
    assert rgb.shape[1] > 2 * rgb.shape[0] * 0.8
    # Columns that are entirely black separate the views (the gaps between them).
    black_columns = np.flatnonzero(rgb.max(axis=(0, 2)) == 0)
    assert len(black_columns) >= 2


def test_real_two_sequence_slice_pair_2d(tmp_path, capsys, png_decoder):
    """The bundled BrainWeb T1 + PD slices: 2D, two channels, one preview view."""
    t1, pd = SAMPLE / "brainweb_t1_slice.nrrd", SAMPLE / "brainweb_pd_slice.nrrd"
    code, err = run_cli(capsys, t1, pd, "-k", "4", "-m", "em-gmm", "--max-iter", "60",
                        "-o", tmp_path / "labels.nrrd", "-p", tmp_path / "probabilities.nrrd",
                        "--preview", tmp_path / "preview.png")
    assert code == 0, err
    reference = sitk.ReadImage(str(t1))
    labels = sitk.ReadImage(str(tmp_path / "labels.nrrd"))
    assert labels.GetDimension() == 2 and labels.GetSize() == reference.GetSize()
    assert labels.GetSpacing() == reference.GetSpacing()
    assert labels.GetOrigin() == reference.GetOrigin()
    label_array = sitk.GetArrayFromImage(labels)
    assert set(np.unique(label_array)) == {1, 2, 3, 4}
    # Class 1 is the darkest in the first channel (T1).
    t1_array = sitk.GetArrayFromImage(reference).astype(float)
    class_means = [t1_array[label_array == k].mean() for k in (1, 2, 3, 4)]
    assert class_means[0] == min(class_means)
    rgb = png_decoder((tmp_path / "preview.png").read_bytes())
    # One view at the image's own aspect (1 mm pixels), possibly enlarged by an integer factor.
    height, width = rgb.shape[:2]
    size_x, size_y = reference.GetSize()
    assert height * size_x == width * size_y
    assert min(colour_fractions(rgb, 4)) > 0.005


def console_script() -> Path:
    script = Path(sys.executable).parent / "deepgmm-segment"
    assert script.exists(), ("the deepgmm-segment console script is not installed next to "
                             f"{sys.executable}; run `make test` (it installs the package)")
    return script


def test_console_script_runs_as_a_subprocess(phantom):
    out = phantom["dir"]
    completed = subprocess.run(
        [str(console_script()), str(phantom["channel_path"]), "--classes", "3",
         "--method", "em-gmm", "--output", str(out / "labels.nii.gz"), "--quiet"],
        capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""  # --quiet
    labels = sitk.ReadImage(str(out / "labels.nii.gz"))
    assert_geometry(labels)
    assert accuracy(sitk.GetArrayFromImage(labels), phantom["truth"]) > 0.97


@pytest.mark.parametrize("signal_number, expected_code",
                         [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_exits_cleanly_without_outputs(phantom, signal_number, expected_code):
    out = phantom["dir"]
    outputs = [out / "labels.nii.gz", out / "probabilities.nii.gz", out / "preview.png"]
    # A deep fit with a huge iteration budget and no early stop: it is still running when the
    # signal arrives, whatever the machine's speed.
    process = subprocess.Popen(
        [str(console_script()), str(phantom["channel_path"]), "-k", "3", "-m", "deepg",
         "--max-iter", "100000", "--tol", "0", "--warm-start", "none",
         "-o", str(outputs[0]), "-p", str(outputs[1]), "--preview", str(outputs[2])],
        stderr=subprocess.PIPE, text=True)
    try:
        first_line = process.stderr.readline()  # the progress bar's first line: fit under way
        assert "iteration" in first_line, first_line
        process.send_signal(signal_number)
        _, rest = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == expected_code, rest
    assert "no output was written" in rest
    assert not any(path.exists() for path in outputs)
    assert not [p for p in os.listdir(out) if p.startswith(".deepgmm-segment")]


def test_model_option_switches_to_trained_model_mode(capsys):
    with pytest.raises(SystemExit) as exit_:
        segment_cli.main(["--model", "brain.pt", "--help"])
    assert exit_.value.code == 0
    assert "--model MODEL" in capsys.readouterr().out


def test_smoothness_label_mrf_and_precision_reach_the_deep_fit(phantom, capsys, monkeypatch):
    import DeepGMMSegmentLib

    real_segment = DeepGMMSegmentLib.segment
    seen = []

    def recording_segment(*args, **kwargs):  # the real engine runs; we keep what it returned
        seen.append(real_segment(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(DeepGMMSegmentLib, "segment", recording_segment)
    out = phantom["dir"] / "labels.nii.gz"
    code, _ = run_cli(capsys, phantom["channel_path"], "-k", "3", "-m", "deepsvg", "--max-iter", "3",
                      "--smoothness", "0.7", "--label-mrf", "off", "--precision", "float32", "-o", out, "-q")
    assert code == 0 and out.exists()
    assert seen[0].options["smoothness"] == 0.7 and seen[0].options["precision"] == "float32"
    assert seen[0].options["label_mrf"] == "off"
    code, _ = run_cli(capsys, phantom["channel_path"], "-k", "3", "-m", "deepsvg", "--max-iter", "3",
                      "--label-mrf", "1.5", "-o", out, "-q")
    assert code == 0 and seen[1].options["label_mrf"] == 1.5
    with pytest.raises(SystemExit) as exit_:  # argparse refuses the value before anything runs
        run_cli(capsys, phantom["channel_path"], "-k", "3", "-m", "deepsvg", "--label-mrf", "-1", "-o", out)
    assert exit_.value.code == 2 and "--label-mrf" in capsys.readouterr().err
    # EM has no network and no spatial prior: the option is refused, nothing is written
    em_out = phantom["dir"] / "em.nii.gz"
    code, err = run_cli(capsys, phantom["channel_path"], "-k", "3", "-m", "em-gmm", "--smoothness", "0.7",
                        "-o", em_out)
    assert code == 2 and "smoothness" in err and not em_out.exists()


def test_prior_means_old_spelling_still_works_with_a_deprecation_message(phantom, capsys):
    """`--prior-means 60 20 100` (one word per class) means the same as `--prior-means '60;20;100'`."""
    out = phantom["dir"]
    common = [phantom["channel_path"], "--classes", 3, "--method", "deepg", "--max-iter", 5, "--device", "cpu",
              "--mask", phantom["mask_path"]]
    code, err = run_cli(capsys, *common, "--prior-means", "60; 20; 100", "-o", out / "new.nii.gz")
    assert code == 0, err
    assert "deprecated" not in err
    with pytest.warns(DeprecationWarning, match="one word per class"):
        code, err = run_cli(capsys, *common, "--prior-means", "60", "20", "100", "-o", out / "old.nii.gz")
    assert code == 0, err
    assert "warning: --prior-means with one word per class is deprecated" in err and "'60;20;100'" in err
    new = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "new.nii.gz")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "old.nii.gz"))), new)
    # The prior fixes the class order: class 1 is the class near 60, i.e. the phantom's third tissue.
    inside = phantom["mask"]
    assert np.mean(new[inside & (phantom["truth"] == 2)] == 1) > 0.9
