"""deepgmm-segment --model with --bias-field-order / --bias-field / --corrected, on real files.

The engine estimates the field jointly with a mixture of the model's classes, then the trained
network segments the corrected image (docs/bias-field.md). The model is a real one, trained by
the project's own training code (../trained_models.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepGMMSegmentLib.cli import segment as segment_cli

from cli_phantoms import make_image, trained_models
from test_cli_segment import assert_geometry, run_cli

phantomCase = trained_models().phantomCase
CLASS_MEANS = np.array([100.0, 200.0, 300.0])  # trained_models.phantomCase, channel 1


def _biased_case(seed: int, amplitude: float) -> dict:
    """One-channel phantom case times a smooth field along x and y (1 - amplitude .. 1 + amplitude)."""
    clean = phantomCase(seed, numberOfChannels=1)[0]
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in clean.shape], indexing="ij")
    field = (1 + amplitude * (2 * x + y) / 3).astype(np.float32)
    truth = (np.abs(clean[..., None] - CLASS_MEANS).argmin(-1) + 1).astype(np.uint8)  # noise sd 8, means 100 apart
    mask = np.zeros(clean.shape, bool)
    mask[:, 1:-1, 1:-1] = True
    return {"image": clean * field, "field": field, "truth": truth, "mask": mask}


def _write_case(folder: Path, case: dict) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    image, mask = folder / "T1.nii.gz", folder / "mask.nii.gz"
    sitk.WriteImage(make_image(case["image"].astype(np.float32)), str(image))
    sitk.WriteImage(make_image(case["mask"].astype(np.uint8)), str(mask))
    return image, mask


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture
def model(trainedModelFile) -> Path:
    return trainedModelFile(channelNames=("T1",), accurate=True)


def test_single_case_writes_field_and_corrected_image_and_segments_the_corrected_image(tmp_path, model, capsys):
    case = _biased_case(11, amplitude=0.6)
    image, mask_path = _write_case(tmp_path / "case", case)
    common = ["--model", model, image, "--mask", mask_path, "--device", "cpu", "-q"]
    code, err = run_cli(capsys, *common, "-o", tmp_path / "plain.nii.gz")
    assert code == 0, err
    code, err = run_cli(capsys, *common, "-o", tmp_path / "labels.nii.gz", "--bias-field", tmp_path / "field.nii.gz",
                        "--corrected", tmp_path / "corrected.nrrd")  # the files alone imply auto
    assert code == 0, err

    mask = case["mask"]
    field_image = sitk.ReadImage(str(tmp_path / "field.nii.gz"))
    assert field_image.GetPixelID() == sitk.sitkFloat32 and field_image.GetSize() == tuple(reversed(mask.shape))
    assert_geometry(field_image)
    field, corrected = sitk.GetArrayFromImage(field_image), _read(tmp_path / "corrected.nrrd")
    assert np.corrcoef(field[mask], case["field"][mask])[0, 1] > 0.95
    assert (field[~mask] == 1).all()
    written = _read(image)
    np.testing.assert_allclose(corrected, np.where(mask, written / field, written), rtol=1e-5)
    # The network saw the corrected image: the field no longer mixes up the classes.
    truth = case["truth"]
    with_field = (_read(tmp_path / "labels.nii.gz")[mask] == truth[mask]).mean()
    without = (_read(tmp_path / "plain.nii.gz")[mask] == truth[mask]).mean()
    assert with_field > 0.98 and with_field > without + 0.04, (with_field, without)


def test_cohort_writes_per_case_fields_and_resumes_on_every_output(tmp_path, model, capsys):
    cohort, out = tmp_path / "cohort", tmp_path / "out"
    cases = {f"p{i}": _biased_case(20 + i, amplitude=0.4) for i in range(2)}
    for case_id, case in cases.items():
        _write_case(cohort / case_id, case)
    arguments = ["--model", model, cohort, "-o", out, "--bias-field", "--corrected", "--device", "cpu"]
    code, err = run_cli(capsys, *arguments)
    assert code == 0, err
    for case_id, case in cases.items():
        mask = case["mask"]
        field = _read(out / f"{case_id}_bias_field.nii.gz")
        assert np.corrcoef(field[mask], case["field"][mask])[0, 1] > 0.95
        np.testing.assert_allclose(_read(out / f"{case_id}_corrected.nii.gz")[mask], case["image"][mask] / field[mask],
                                   rtol=1e-5)
        assert (_read(out / f"{case_id}_labels.nii.gz")[mask] == case["truth"][mask]).mean() > 0.95

    # A finished case is skipped only when every output it should have exists.
    (out / "p1_corrected.nii.gz").unlink()
    code, err = run_cli(capsys, *arguments)
    assert code == 0, err
    log = (out / "deepgmm-batch-log.tsv").read_text().splitlines()
    assert [row.split("\t")[1:3] for row in log[-2:]] == [["p0", "skipped"], ["p1", "done"]]
    assert (out / "p1_corrected.nii.gz").exists()


@pytest.mark.parametrize("extra, message", [
    (["--bias-field-order", "none", "--corrected", "{tmp}/c.nii.gz"], "need a bias field"),
    (["--bias-field"], "for a single case give the file name: --bias-field FIELD"),
    (["--corrected", "{image}"], "--corrected '.*T1.nii.gz' is also an input"),
])
def test_bad_bias_field_requests_are_one_line_errors(tmp_path, model, capsys, extra, message):
    image, mask = _write_case(tmp_path / "case", _biased_case(30, amplitude=0.3))
    extra = [a.format(tmp=tmp_path, image=image) for a in extra]
    code, err = run_cli(capsys, "--model", model, image, "--mask", mask, "-o", tmp_path / "labels.nii.gz", *extra)
    assert code == segment_cli.EXIT_USAGE
    assert err.count("\n") == 1 and err.startswith("deepgmm-segment: error:")
    assert re.search(message, err), err
    assert not (tmp_path / "labels.nii.gz").exists()


def test_cohort_takes_the_files_as_flags_only(tmp_path, model, capsys):
    _write_case(tmp_path / "cohort" / "p0", _biased_case(31, amplitude=0.3))
    code, err = run_cli(capsys, "--model", model, "--bias-field", "field.nii.gz", tmp_path / "cohort",
                        "-o", tmp_path / "out")
    assert code == segment_cli.EXIT_USAGE and "in a cohort --bias-field is a flag" in err, err


def test_signed_images_are_refused_with_the_way_out(tmp_path, model, capsys):
    case = _biased_case(32, amplitude=0.3)
    case["image"] = case["image"] - 250.0  # zero-centred, as CT in HU: a multiplicative field makes no sense
    image, mask = _write_case(tmp_path / "case", case)
    code, err = run_cli(capsys, "--model", model, image, "--mask", mask, "-o", tmp_path / "labels.nii.gz",
                        "--bias-field-order", "auto", "--device", "cpu")
    assert code == segment_cli.EXIT_USAGE and "bias_field" in err and "none" in err, err
    assert not (tmp_path / "labels.nii.gz").exists()
