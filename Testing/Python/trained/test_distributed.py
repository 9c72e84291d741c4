"""The distributed path: deepgmm-train under torchrun (2 gloo processes on CPU) trains the same model
as one process on the same data and seed."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch

from synthetic_cohort import synthetic_case, write_case_folders

TRAIN_ARGS = ["-k", "3", "--epochs", "3", "--min-epochs", "3", "--base-width", "4", "--depth", "2",
              "--batch-size", "3", "--device", "cpu", "--prior-means", "auto", "--seed", "7", "-q"]


def _run(command, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _output_irrelevant(name: str) -> bool:
    # Biases of the convolutions right before an InstanceNorm (ConvBlock layers 0 and 3) cancel in
    # the normalisation: their gradient is rounding noise, which Adam scales up to +-lr per step,
    # so they may differ between runs without any effect on the network's output.
    return name.endswith((".0.bias", ".3.bias"))


def test_torchrun_two_processes_train_the_same_model_as_one(tmp_path):
    from DeepGMMSegmentLib.core.inputs import normalize_channels
    from DeepGMMSegmentLib.trained.model_file import load_model
    from DeepGMMSegmentLib.trained.training import predict_with_model

    # 7 training cases with batch size 3: the last batch (1 case) leaves one process without an
    # image, which must still join the gradient all-reduce with weight 0.
    write_case_folders(tmp_path / "cohort", 9)
    _run([sys.executable, "-m", "DeepGMMSegmentLib.cli.train", "cohort", "-o", "one.pt", *TRAIN_ARGS], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "DeepGMMSegmentLib.cli.train", "cohort", "-o", "two.pt", *TRAIN_ARGS], tmp_path)

    one, meta_one = load_model(tmp_path / "one.pt")
    two, meta_two = load_model(tmp_path / "two.pt")
    assert meta_one["training"]["world_size"] == 1
    assert meta_two["training"]["world_size"] == 2
    assert meta_one["training"]["n_train"] == meta_two["training"]["n_train"] == 7
    np.testing.assert_allclose(meta_two["training"]["train_loss_history"], meta_one["training"]["train_loss_history"],
                               rtol=1e-5)
    np.testing.assert_allclose(meta_two["training"]["val_loss_history"], meta_one["training"]["val_loss_history"],
                               rtol=1e-5)
    compared = 0
    for name, tensor in one.items():
        if not _output_irrelevant(name):
            torch.testing.assert_close(two[name], tensor, rtol=1e-3, atol=1e-4, msg=f"parameter {name} differs")
            compared += 1
    assert compared > 10
    # Only rank 0 wrote files: one model and one curve per run.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "one.pt", "one_curve.png", "two.pt", "two_curve.png"]

    for seed in (100, 101):
        image, mask, _ = synthetic_case(seed, n_channels=2)
        x, _, _ = normalize_channels(image, mask)
        args = (torch.from_numpy(x), torch.from_numpy(mask))
        p1, _ = predict_with_model(*args, tmp_path / "one.pt", 0, torch.device("cpu"), 0)
        p2, _ = predict_with_model(*args, tmp_path / "two.pt", 0, torch.device("cpu"), 0)
        assert (p1.exp() - p2.exp()).abs().max().item() < 1e-4
