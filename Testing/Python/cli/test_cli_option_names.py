"""The option names of the three commands are contracts (docs/usage.md, docs/training.md): none may
disappear, and an option several commands offer means the same in each (cli/common.SHARED_OPTIONS)."""

from __future__ import annotations

import pytest

from DeepGMMSegmentLib.cli import segment, segment_model, train

PARSERS = {"deepgmm-segment": segment.build_parser, "deepgmm-segment --model": segment_model.build_parser,
           "deepgmm-train": train.build_parser}
SHARED = ("--classes", "--device", "--seed", "--threads", "--quiet", "--channels", "--mask-name", "--covariance",
          "--prior-weight", "--warm-start", "--smoothness", "--precision", "--bias-field-order", "--bias-field",
          "--corrected")

CONTRACT = {
    "deepgmm-segment": {
        "-k", "--classes", "-m", "--method", "-o", "--output", "-p", "--probabilities", "--mask", "--seeds",
        "--preview", "--device", "--seed", "--max-iter", "--tol", "--covariance", "--prior-means",
        "--prior-weight", "--warm-start", "--smoothness", "--label-mrf", "--precision", "--bias-field-order",
        "--bias-field", "--corrected", "--threads", "-q", "--quiet"},
    "deepgmm-segment --model": {
        "--model", "-o", "--output", "--mask", "-p", "--probabilities", "-k", "--classes", "--fine-tune",
        "--channels", "--mask-name", "--overwrite", "--workers", "--device", "--seed", "--threads", "-q",
        "--quiet", "--bias-field-order", "--bias-field", "--corrected"},
    "deepgmm-train": {
        "-k", "--classes", "-o", "--output", "-m", "--method", "--channels", "--mask-name", "--prior-means",
        "--class-names", "--prior-weight", "--epochs", "--min-epochs", "--patience", "--batch-size", "--lr",
        "--val-fraction", "--no-augment", "--patch-size", "--warm-start", "--network", "--base-width",
        "--depth", "--covariance", "--smoothness", "--precision", "--device", "--seed", "--threads", "--curve",
        "-q", "--quiet"},
}


def _actions(command: str) -> dict:
    return {flag: action for action in PARSERS[command]()._actions for flag in action.option_strings}


@pytest.mark.parametrize("command", sorted(CONTRACT))
def test_every_documented_option_is_still_there(command):
    assert CONTRACT[command] <= set(_actions(command)), CONTRACT[command] - set(_actions(command))


@pytest.mark.parametrize("flag", SHARED)
def test_a_shared_option_parses_the_same_in_every_command(flag):
    offered = {command: _actions(command)[flag] for command in PARSERS if flag in _actions(command)}
    assert len(offered) >= 2, f"{flag} is offered by one command only: it need not be shared"
    kinds = {(type(a).__name__, a.type, tuple(a.choices or ()), a.dest, a.metavar) for a in offered.values()}
    assert len(kinds) == 1, kinds
