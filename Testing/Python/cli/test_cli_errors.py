"""Every bad input: exit code 2, one line on stderr naming the problem, no output file left."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepGMMSegmentLib.cli import segment as segment_cli

from cli_phantoms import make_image


def _write(path: Path, array: np.ndarray, dimension: int = 3, **kwargs) -> Path:
    sitk.WriteImage(make_image(array, dimension=dimension, **kwargs), str(path))
    return path


def _bad_channel_nan(d: Path) -> list:
    array = np.random.default_rng(0).normal(size=(6, 8, 8)).astype(np.float32)
    array[2, 3, 4] = np.nan
    return [_write(d / "nan.nrrd", array), "-k", "3"]  # NIfTI reading drops NaN


def _vector_channel(d: Path) -> list:
    image = sitk.Image([8, 8, 4], sitk.sitkVectorFloat32, 3)
    sitk.WriteImage(image, str(d / "vector.nrrd"))
    return [d / "vector.nrrd", "-k", "3"]


def _four_d_channel(d: Path) -> list:
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkFloat32), str(d / "four_d.nii.gz"))
    return [d / "four_d.nii.gz", "-k", "2"]


def _two_d_second_channel(d: Path) -> list:
    second = _write(d / "slice.nrrd", np.ones((8, 8), np.float32), dimension=2)
    return [d / "t1.nrrd", second, "-k", "3"]


def _two_d_mask(d: Path) -> list:
    mask = _write(d / "mask2d.nrrd", np.ones((8, 8), np.uint8), dimension=2)
    return [d / "t1.nrrd", "--mask", mask, "-k", "3"]


def _empty_mask(d: Path) -> list:
    mask = _write(d / "empty.nii.gz", np.zeros((10, 22, 26), np.uint8))
    return [d / "t1.nrrd", "--mask", mask, "-k", "3"]


def _mask_outside(d: Path) -> list:
    far = _write(d / "far.nii.gz", np.ones((10, 22, 26), np.uint8), origin=(900.0, 0.0, 0.0))
    return [d / "t1.nrrd", "--mask", far, "-k", "3"]


def _channel_outside(d: Path) -> list:
    far = _write(d / "far.nii.gz", np.ones((10, 22, 26), np.float32), origin=(900.0, 0.0, 0.0))
    return [d / "t1.nrrd", far, "-k", "3"]


def _not_an_image(d: Path) -> list:
    (d / "notes.nii.gz").write_text("this is not an image\n")
    return [d / "notes.nii.gz", "-k", "3"]


CASES = {
    # name: (arguments after the outputs are added, words the message must contain)
    "missing channel": (lambda d: [d / "absent.nii.gz", "-k", "3"], ["does not exist"]),
    "directory as channel": (lambda d: [d, "-k", "3"], ["is a directory"]),
    "unreadable channel": (_not_an_image, ["cannot read channel 1"]),
    "4D channel": (_four_d_channel, ["4 dimensions"]),
    "vector channel": (_vector_channel, ["3 components"]),
    "2D channel beside 3D": (_two_d_second_channel, ["channel 2", "2D", "3D"]),
    "channel outside the first": (_channel_outside, ["does not overlap"]),
    "2D mask for 3D channels": (_two_d_mask, ["mask", "2D"]),
    "empty mask": (_empty_mask, ["no non-zero voxel"]),
    "mask outside the image": (_mask_outside, ["no non-zero voxel"]),
    "NaN in channel (engine)": (_bad_channel_nan, ["NaN"]),
    "constant channel (engine)": (
        lambda d: [_write(d / "flat.nrrd", np.full((6, 8, 8), 7.0, np.float32)), "-k", "2"],
        ["constant"]),
    "one class": (lambda d: [d / "t1.nrrd", "-k", "1"], ["at least 2"]),
    "too many classes": (lambda d: [d / "t1.nrrd", "-k", "300"], ["at most 255"]),
    "unknown method": (lambda d: [d / "t1.nrrd", "-k", "3", "-m", "kmeans"], ["invalid choice"]),
    "missing --classes": (lambda d: [d / "t1.nrrd"], ["--classes"]),
    "non-numeric --classes": (lambda d: [d / "t1.nrrd", "-k", "three"], ["invalid int"]),
    "zero --max-iter": (lambda d: [d / "t1.nrrd", "-k", "3", "--max-iter", "0"], [">= 1"]),
    "unknown device": (lambda d: [d / "t1.nrrd", "-k", "3", "--device", "tpu"], ["device"]),
    "prior means count": (lambda d: [d / "t1.nrrd", "-k", "3", "--prior-means", "1;2"],
                          ["one mean per class"]),
    "prior means channels": (lambda d: [d / "t1.nrrd", "-k", "2", "--prior-means", "1,2;3,4"],
                             ["one value per channel"]),
    "prior weight alone": (lambda d: [d / "t1.nrrd", "-k", "3", "--prior-weight", "0.5"],
                           ["--prior-means"]),
}


@pytest.fixture
def work(tmp_path: Path, phantom) -> Path:
    return phantom["dir"]


def _outputs(d: Path) -> list[Path]:
    return [d / "out_labels.nii.gz", d / "out_probabilities.nii.gz", d / "out_preview.png"]


def _assert_failed_cleanly(code: int, err: str, d: Path, before: set[str], words) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("deepgmm-segment: error:"), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert set(os.listdir(d)) == before, "an output or staging file was left behind"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line_and_no_output(name, work, capsys):
    build, words = CASES[name]
    arguments = [str(a) for a in build(work)]
    before = set(os.listdir(work))
    output, probabilities, preview = _outputs(work)
    argv = arguments + ["-o", str(output), "-p", str(probabilities), "--preview", str(preview)]
    if "--max-iter" not in arguments:
        argv += ["--max-iter", "5"]  # keeps a wrongly accepted input from running long
    try:
        code = segment_cli.main(argv)
    except SystemExit as exit_:  # argparse errors exit from inside parse_args
        code = exit_.code
    _assert_failed_cleanly(code, capsys.readouterr().err, work, before, words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error(work, capsys):
    before = set(os.listdir(work))
    code = segment_cli.main([str(work / "t1.nrrd"), "-k", "3", "-m", "em-gmm", "--device", "cuda",
                     "-o", str(work / "labels.nii.gz")])
    _assert_failed_cleanly(code, capsys.readouterr().err, work, before, ["CUDA"])


@pytest.mark.parametrize("option", ["-o", "-p"])
def test_output_that_is_an_input_is_refused_and_input_untouched(work, capsys, option):
    channel = work / "t1.nrrd"
    content = channel.read_bytes()
    argv = [str(channel), "-k", "3", "-m", "em-gmm", "-o", str(work / "labels.nii.gz")]
    argv += [option, str(channel)] if option == "-p" else []
    if option == "-o":
        argv[-1] = str(channel)
    before = set(os.listdir(work))
    code = segment_cli.main(argv)
    _assert_failed_cleanly(code, capsys.readouterr().err, work, before,
                           ["is also an input"])
    assert channel.read_bytes() == content


@pytest.mark.parametrize("outputs, words", [
    (["-o", "{d}/no_such_dir/labels.nii.gz"], ["does not exist"]),
    (["-o", "{d}/labels.xyz"], ["cannot write label map"]),
    (["-o", "{d}/labels.nii.gz", "-p", "{d}/labels.nii.gz"], ["both name"]),
    (["-o", "{d}/labels.nii.gz", "--preview", "{d}/preview.jpg"], [".png"]),
])
def test_bad_output_is_refused_before_segmenting(work, capsys, outputs, words):
    before = set(os.listdir(work))
    argv = [str(work / "t1.nrrd"), "-k", "3", "-m", "em-gmm"]
    argv += [item.format(d=work) for item in outputs]
    code = segment_cli.main(argv)
    err = capsys.readouterr().err
    _assert_failed_cleanly(code, err, work, before, words)
    assert "iteration" not in err  # refused before the segmentation started


def test_failure_while_writing_leaves_no_output(work, capsys, monkeypatch):
    """The probabilities fail to write after the labels were written: neither file remains."""
    from DeepGMMSegmentLib.cli import images

    real_write = images.write_image

    def failing_write(image, path, role):
        if role == "probabilities":
            raise segment_cli.CliError("cannot write probabilities (disk full)")
        real_write(image, path, role)

    monkeypatch.setattr(images, "write_image", failing_write)
    before = set(os.listdir(work))
    code = segment_cli.main([str(work / "t1.nrrd"), "-k", "3", "-m", "em-gmm",
                     "-o", str(work / "labels.nii.gz"), "-p", str(work / "probs.nii.gz")])
    _assert_failed_cleanly(code, capsys.readouterr().err, work, before, ["disk full"])


def test_existing_output_is_replaced_only_on_success(work, capsys):
    labels = work / "labels.nii.gz"
    labels.write_bytes(b"previous result")
    code = segment_cli.main([str(work / "t1.nrrd"), "-k", "1", "-o", str(labels)])
    assert code == 2
    assert labels.read_bytes() == b"previous result"
    capsys.readouterr()
    code = segment_cli.main([str(work / "t1.nrrd"), "-k", "3", "-m", "em-gmm", "-q", "-o", str(labels)])
    assert code == 0
    assert sitk.ReadImage(str(labels)).GetPixelID() == sitk.sitkUInt8


def test_a_signal_also_sets_the_cancel_event_the_engine_polls():
    """Python drops an exception raised while a finaliser runs; the event still stops the fit."""
    import signal as signal_module

    import pytest as _pytest

    from DeepGMMSegmentLib.cli.common import Interrupts, Terminated

    interrupts = Interrupts()
    with _pytest.raises(KeyboardInterrupt):
        interrupts.on_interrupt(signal_module.SIGINT, None)
    assert interrupts.cancel.is_set() and isinstance(interrupts.stopped(), KeyboardInterrupt)
    interrupts = Interrupts()
    with _pytest.raises(Terminated):
        interrupts.on_terminate(signal_module.SIGTERM, None)
    assert interrupts.cancel.is_set() and isinstance(interrupts.stopped(), Terminated)
