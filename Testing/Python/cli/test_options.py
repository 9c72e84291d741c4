"""options.py: one method list, defaults once, parameter checks, one prior-means syntax (torch-free)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from DeepGMMSegmentLib import options

REPO = Path(__file__).resolve().parents[3]


def test_options_and_result_load_without_torch():
    code = ("import sys; sys.modules['torch'] = None; "
            "import DeepGMMSegmentLib.options, DeepGMMSegmentLib.result, DeepGMMSegmentLib.cli.segment; "
            "DeepGMMSegmentLib.cli.segment.build_parser()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO / "DeepGMMSegment")


@pytest.mark.parametrize("text, expected", [
    ("30,200; 80,120; 110,60", [[30, 200], [80, 120], [110, 60]]),
    ("30:200;80:120;110:60", [[30, 200], [80, 120], [110, 60]]),  # ':' between channels still reads
    ("-1.2;0.1;1.0", [[-1.2], [0.1], [1.0]]),
])
def test_prior_means_syntax(text, expected):
    values = options.parse_prior_means(text, 3)
    np.testing.assert_array_equal(values, np.asarray(expected, float))


def test_prior_means_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="one mean per class"):
        options.parse_prior_means("1;2", 3)
    with pytest.raises(ValueError, match="one value per channel"):
        options.parse_prior_means("1,2;3,4", 2, 1)
    with pytest.raises(ValueError, match="not a number"):
        options.parse_prior_means("1;two", 2)
    with pytest.raises(ValueError):  # "auto" only where it applies (training)
        options.parse_prior_means("auto", 3)
    assert options.parse_prior_means("auto", 3, allow_auto=True) == "auto"
    np.save(tmp_path / "p.npy", np.array([[1.0, 2.0], [3.0, 4.0]]))
    np.testing.assert_array_equal(options.parse_prior_means(str(tmp_path / "p.npy"), 2, allow_files=True),
                                  [[1.0, 2.0], [3.0, 4.0]])


def test_legacy_prior_means_words_are_joined_and_flagged():
    assert options.legacy_prior_means_text(["30:200", "80:120"]) == ("30:200;80:120", True)
    assert options.legacy_prior_means_text(["30,200;80,120"]) == ("30,200;80,120", False)


@pytest.mark.parametrize("method, given, words", [
    ("em-gmm", {"max_iter": 0}, ["max_iter", ">= 1", "got 0"]),
    ("deepsvg", {"smoothness": -1}, ["smoothness", ">= 0", "turns the spatial prior off"]),
    ("deepsvg", {"learning_rate": 0}, ["learning_rate", "> 0"]),
    ("deepsvg", {"precision": "half"}, ["precision", "'bfloat16'"]),
    ("em-gmm", {"smoothness": 0.3}, ["Unknown option", "smoothness", "valid options"]),
    ("em-gmm", {"model": "m.pt"}, ["deep methods"]),
    ("kmeans", {}, ["Unknown method", "deepsvg"]),
])
def test_resolve_options_rejects_with_a_message_that_says_what_to_do(method, given, words):
    with pytest.raises(ValueError) as error:
        options.resolve_options(method, **given)
    assert all(word in str(error.value) for word in words), str(error.value)


def test_training_settings_replace_names_the_valid_settings():
    settings = options.TrainingSettings().replace(max_epochs=3)
    assert settings.max_epochs == 3 and options.TrainingSettings().max_epochs == 100
    with pytest.raises(ValueError, match="Unknown training setting.*max_epoch_count.*valid settings"):
        options.TrainingSettings().replace(max_epoch_count=3)


def test_the_cli_choices_come_from_the_method_list():
    from DeepGMMSegmentLib.cli import segment as segment_cli
    from DeepGMMSegmentLib.cli import train as train_cli

    actions = {a.dest: a for a in segment_cli.build_parser()._actions}
    assert tuple(actions["method"].choices) == options.METHODS
    assert actions["method"].default == options.DEFAULT_METHOD
    train_actions = {a.dest: a for a in train_cli.build_parser()._actions}
    assert tuple(train_actions["method"].choices) == options.DEEP_METHODS
    assert train_actions["epochs"].default == options.TrainingSettings().max_epochs
