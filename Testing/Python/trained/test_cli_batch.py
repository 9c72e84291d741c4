"""deepgmm-train and deepgmm-segment --model on real files: cohort layouts, training curve, batch skip/continue."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from synthetic_cohort import accuracy, synthetic_case, write_case_folders

TRAIN = ["-k", "3", "--epochs", "6", "--min-epochs", "6", "--base-width", "8", "--depth", "2",
         "--device", "cpu", "--prior-means", "auto", "--class-names", "dark,middle,bright", "-q"]


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A model trained by deepgmm-train on a folder of case folders (T1, T2, mask)."""
    from DeepGMMSegmentLib.cli import train as train_cli

    root = tmp_path_factory.mktemp("cli")
    write_case_folders(root / "cohort", 8)
    model = root / "model.pt"
    assert train_cli.main([str(root / "cohort"), "-o", str(model), *TRAIN]) == 0
    return model


def test_deepgmm_train_writes_model_and_curve(cli_model):
    from DeepGMMSegmentLib.trained import model_file

    info = model_file.describe_model(cli_model)
    assert info["channel_names"] == ["T1", "T2"] and info["n_classes"] == 3
    assert info["class_names"] == ["dark", "middle", "bright"]  # auto prior means: ascending T1
    assert info["training"]["n_train"] + info["training"]["n_val"] == 8
    curve = cli_model.with_name("model_curve.png")
    data = curve.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 500


def test_training_curve_shows_both_series():
    from DeepGMMSegmentLib.cli.preview import render_curve

    history = [dict(epoch=e, train_loss=2.0 - 0.1 * e, val_loss=2.1 - 0.08 * e) for e in range(1, 6)]
    image = render_curve(history, best_epoch=5)
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours and (190, 190, 190) in colours


def _write_cohort_for_batch(root: Path, first_seed: int = 50) -> list[str]:
    ids = write_case_folders(root, 3, first_seed=first_seed)
    return ids


def test_batch_segments_a_folder_skips_done_cases_and_continues_past_a_bad_one(tmp_path, cli_model, capsys):
    from DeepGMMSegmentLib.cli import segment as segment_cli

    cohort = tmp_path / "new"
    ids = _write_cohort_for_batch(cohort)
    out = tmp_path / "out"
    assert segment_cli.main(["--model", str(cli_model), str(cohort), "-o", str(out), "--device", "cpu"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 3 and all(": done in " in line for line in lines)
    assert all("dark " in line and "bright " in line for line in lines)  # shares named by the model
    for i, case_id in enumerate(ids):
        labels = sitk.ReadImage(str(out / f"{case_id}_labels.nii.gz"))
        _, mask, truth = synthetic_case(50 + i, n_channels=2)
        assert accuracy(sitk.GetArrayFromImage(labels), truth, mask) > 0.9

    # Add a broken case and a new good case: the finished ones are skipped, the bad one fails
    # with its own message, the good one is still done, and the exit status says "some failed".
    (cohort / "broken").mkdir()
    (cohort / "broken" / "T1.nii.gz").write_bytes(b"not an image")
    (cohort / "broken" / "T2.nii.gz").write_bytes(b"not an image")
    extra = write_case_folders(tmp_path / "extra", 1, first_seed=60)[0]
    (tmp_path / "extra" / extra).rename(cohort / "zlast")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_labels.nii.gz")}
    assert segment_cli.main(["--model", str(cli_model), str(cohort), "-o", str(out), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert sum(line.startswith("[") and "skipped" in line for line in captured.out.splitlines()) == 3
    assert any("broken: FAILED:" in line and "cannot read channel 1" in line for line in captured.err.splitlines())
    assert any("zlast: done" in line for line in captured.out.splitlines())
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_labels.nii.gz") if p.name in before} == before
    assert (out / "zlast_labels.nii.gz").exists() and not (out / "broken_labels.nii.gz").exists()
    log = (out / "deepgmm-batch-log.tsv").read_text().splitlines()
    assert log[0].split("\t")[:3] == ["time", "case", "status"]
    assert [row.split("\t")[2] for row in log[1:]].count("failed") == 1


def test_batch_with_two_worker_processes(tmp_path, cli_model):
    from DeepGMMSegmentLib.cli.segment_model import run_batch
    from DeepGMMSegmentLib.cli.cohort import discover_cases

    ids = _write_cohort_for_batch(tmp_path / "cohort", first_seed=70)
    cases, _ = discover_cases(tmp_path / "cohort", ["T1", "T2"])
    said = []
    summary = run_batch(cases, tmp_path / "out", str(cli_model), workers=2, threads=1, device="cpu",
                        probabilities=True, say=said.append)
    assert summary.count("done") == 3 and not summary.failed
    for case_id in ids:
        probabilities = sitk.ReadImage(str(tmp_path / "out" / f"{case_id}_probabilities.nii.gz"))
        assert probabilities.GetNumberOfComponentsPerPixel() == 3


def test_single_case_with_model_and_mismatch_message(tmp_path, cli_model, capsys):
    from DeepGMMSegmentLib.cli import segment as segment_cli

    write_case_folders(tmp_path, 1, first_seed=80)
    case = tmp_path / "case00"
    out = tmp_path / "labels.nii.gz"
    status = segment_cli.main(["--model", str(cli_model), str(case / "T1.nii.gz"), str(case / "T2.nii.gz"),
                       "--mask", str(case / "mask.nii.gz"), "-o", str(out), "--fine-tune", "3", "--device", "cpu"])
    assert status == 0 and out.exists()
    _, mask, truth = synthetic_case(80, n_channels=2)
    assert accuracy(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), truth, mask) > 0.9

    status = segment_cli.main(["--model", str(cli_model), str(case / "T1.nii.gz"), "-o", str(tmp_path / "x.nii.gz")])
    assert status == 2
    assert "expects 2 channel(s) (T1, T2) but the input has 1" in capsys.readouterr().err
    status = segment_cli.main(["--model", str(tmp_path / "missing.pt"), str(case / "T1.nii.gz"), "-o", str(out)])
    assert status == 2


def test_label_mrf_reaches_a_model_run(tmp_path, cli_model, capsys):
    """--label-mrf off: the network's own labels (segment(label_mrf="off")); the default relabels them."""
    from DeepGMMSegmentLib import segment
    from DeepGMMSegmentLib.cli import segment as segment_cli

    write_case_folders(tmp_path, 1, first_seed=81)
    case = tmp_path / "case00"
    files = [str(case / "T1.nii.gz"), str(case / "T2.nii.gz"), "--mask", str(case / "mask.nii.gz")]
    image, mask, _ = synthetic_case(81, n_channels=2)
    labels = {}
    for value in ("off", None):
        out = tmp_path / f"labels-{value}.nii.gz"
        extra = [] if value is None else ["--label-mrf", value]
        assert segment_cli.main(["--model", str(cli_model), *files, "-o", str(out), "--device", "cpu", *extra]) == 0
        labels[value] = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        expected = segment(list(image), 3, method="deepsvg", mask=mask, spacing=(1.0, 1.0), device="cpu", seed=0,
                           model=str(cli_model), **({} if value is None else {"label_mrf": value}))
        np.testing.assert_array_equal(labels[value], expected.labels)
    assert (labels["off"] != labels[None]).any()
    with pytest.raises(SystemExit) as stopped:
        segment_cli.main(["--model", str(cli_model), *files, "-o", str(tmp_path / "x.nii.gz"), "--label-mrf", "strong"])
    assert stopped.value.code == 2
    assert "--label-mrf: expected 'off' or a number >= 0, got 'strong'" in capsys.readouterr().err


def test_cohort_layouts(tmp_path):
    from DeepGMMSegmentLib.cli.cohort import discover_cases

    for name in ("a.nii.gz", "a_mask.nii.gz", "b.nrrd", "notes.txt"):
        (tmp_path / "flat").mkdir(exist_ok=True)
        (tmp_path / "flat" / name).write_bytes(b"")
    cases, names = discover_cases(tmp_path / "flat")
    assert [(c.case_id, Path(c.channels[0]).name, c.mask and Path(c.mask).name) for c in cases] == [
        ("a", "a.nii.gz", "a_mask.nii.gz"), ("b", "b.nrrd", None)]

    (tmp_path / "multi").mkdir()
    for name in ("p1_T1.nii.gz", "p1_T2.nii.gz", "p1_mask.nii.gz", "p2_T1.nii.gz", "p2_T2.nii.gz"):
        (tmp_path / "multi" / name).write_bytes(b"")
    cases, names = discover_cases(tmp_path / "multi", ["T1", "T2"])
    assert names == ["T1", "T2"] and [c.case_id for c in cases] == ["p1", "p2"]
    assert Path(cases[0].mask).name == "p1_mask.nii.gz" and cases[1].mask is None

    csv = tmp_path / "cases.csv"
    csv.write_text("case,FLAIR,T1,mask\nx1,img/f1.nii.gz,img/t1.nii.gz,\nx2,/abs/f2.nii,/abs/t2.nii,/abs/m2.nii\n")
    cases, names = discover_cases(csv)
    assert names == ["FLAIR", "T1"]
    assert cases[0].channels == [str(tmp_path / "img/f1.nii.gz"), str(tmp_path / "img/t1.nii.gz")]
    assert cases[0].mask is None and cases[1].mask == "/abs/m2.nii"

    (tmp_path / "folders" / "c1").mkdir(parents=True)
    (tmp_path / "folders" / "c2").mkdir()
    for name in ("T1.nii.gz", "T2.nii.gz"):
        (tmp_path / "folders" / "c1" / name).write_bytes(b"")
    (tmp_path / "folders" / "c2" / "T1.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="c2.*same channel files"):
        discover_cases(tmp_path / "folders")
    with pytest.raises(ValueError, match="no image named T2"):
        discover_cases(tmp_path / "folders", ["T1", "T2"])
    with pytest.raises(ValueError, match="does not exist"):
        discover_cases(tmp_path / "nowhere")


def test_deepgmm_train_reports_bad_input(tmp_path, capsys):
    from DeepGMMSegmentLib.cli import train as train_cli

    (tmp_path / "empty").mkdir()
    assert train_cli.main([str(tmp_path / "empty"), "-k", "3", "-o", str(tmp_path / "m.pt")]) == 2
    assert "holds no image files" in capsys.readouterr().err
    write_case_folders(tmp_path / "c", 2)
    assert train_cli.main([str(tmp_path / "c"), "-k", "3", "-o", str(tmp_path / "m.pt"),
                           "--prior-means", "1;2"]) == 2
    assert "2 rows but there are 3 classes" in capsys.readouterr().err
    assert train_cli.main([str(tmp_path / "c"), "-k", "3", "-o", str(tmp_path / "m.pt"),
                           "--class-names", "blood,scar"]) == 2
    assert "must be 3 non-empty names" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()
