"""The cardiac evaluation's "trained on N, tested on M" rows (evaluation/cardiac_run.py, method notes §2.3)."""

import numpy as np
import pytest

from DeepGMMSegmentLib import segment
from DeepGMMSegmentLib.trained.inference import load_trained_model
from evaluation import cardiac_phantom as cp, cardiac_run

# Tiny and coarse (the evaluation's cases are 128 px, 3x supersampled, 20 training patients) and a
# few optimiser steps: this checks the path and the scoring, not the figures.
FAST = cp.PhantomSettings(size=104, supersampling=1, n_slices=(5, 6))
SMOKE = {"max_epochs": 1, "min_epochs": 1, "warm_start_steps": 4, "base_width": 4, "depth": 2}
BLOOD, MYOCARDIUM = 1, 2


@pytest.fixture(scope="module")
def cohort():
    train = cp.generate_cohort(3, first_seed=cardiac_run.TRAIN_FIRST_SEED, settings=FAST)
    test = next(c for c in (cp.generate_case(s, FAST) for s in range(4)) if c.has_infarct)
    return train, [test]


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    train, test = cohort
    folder = tmp_path_factory.mktemp("models")
    return cardiac_run.evaluate_trained(train, test, seed=0, log=lambda *a, **k: None, training_options=SMOKE,
                                        folder=folder), folder


def _row(markdown: str, name: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_trained_rows_sit_beside_the_oracle_and_em_on_the_same_test_cases(cohort, trained):
    (train, test), (evaluation, folder) = cohort, trained
    markdown = evaluation.markdown
    assert markdown.startswith("### Trained on 3 patients, tested on 1 (mean regularisation, no matching)")
    names = ["oracle", "oracle + smoothing", "em-gmm + μ_data", "deepg trained on 3, λ = 1",
             "deepsvg trained on 3, λ = 1"]
    assert [v.name for v in evaluation.results] == names
    for name in names:
        assert _row(markdown, name)[1] == "1"  # one test case each
    assert all([c.seed for c, _ in runs] == [test[0].seed] for runs in evaluation.results.values())
    assert "SYNTHETIC patients 100..102" in markdown and f"Tested on patients {test[0].seed}" in markdown
    assert "s per case" not in markdown  # times only when asked
    # the held-out split comes out of the training patients, never the test ones
    assert set(evaluation.train_seeds) == {100, 101, 102} and not set(evaluation.train_seeds) & set(evaluation.test_seeds)
    for method in cardiac_run.DEEP:
        assert evaluation.training[method]["n_train"] + evaluation.training[method]["n_val"] == len(train)


def test_networks_are_trained_with_mu_data_in_normalised_units(cohort, trained):
    (train, _), (evaluation, folder) = cohort, trained
    prior = cardiac_run.training_prior_means(train)
    np.testing.assert_allclose(evaluation.prior_means, prior)
    # blood brightest in bSSFP, edema brightest in T2, myocardium darkest in LGE: μ_data's pattern
    assert prior[:, 2].argmax() == 0 and prior[:, 1].argmax() == 2 and prior[:, 0].argmin() == 1
    # per case, the conversion is what segment(prior_means=case.prior_means()) does: mask z-scores
    one = cardiac_run.training_prior_means(train[:1])
    inside = train[0].channels[:, train[0].mask].astype(np.float64)
    np.testing.assert_allclose(one, (train[0].prior_means() - inside.mean(1)) / inside.std(1), rtol=1e-5, atol=1e-5)
    for method in cardiac_run.DEEP:
        _, meta = load_trained_model(folder / f"{method}.pt")
        assert meta["method"] == method and meta["network"]["spatial_dims"] == 2 and meta["prior_weight"] == 1.0
        np.testing.assert_allclose(meta["prior_means"], prior)
        assert meta["class_names"] == list(cp.CLASS_NAMES)


def test_trained_rows_are_the_models_forward_pass_scored_without_matching(cohort, trained):
    (_, test), (evaluation, folder) = cohort, trained
    case = test[0]
    for variant, runs in evaluation.results.items():
        if variant.model is None:
            continue
        labels = runs[0][1]
        again = segment(list(case.channels), 4, method=variant.name.split(" ")[0], mask=case.mask,
                        spacing=case.spacing, device="cpu", seed=0, model=variant.model).labels
        np.testing.assert_array_equal(labels, again)
        as_given = cardiac_run.score(labels, case, matched=False)
        row = _row(evaluation.markdown, variant.name)
        assert row[2:6] == [f"{d:.3f}" for d in as_given.dice]
        assert row[9] == f"{int(as_given.identity_ok)}/1"


def test_class_identity_comes_from_the_prior_not_from_matching(cohort):
    """Trained with μ_data's blood and myocardium rows swapped, class 1 is the myocardium, and the row says so."""
    train, test = cohort
    swapped = cardiac_run.training_prior_means(train)[[1, 0, 2, 3]]
    evaluation = cardiac_run.evaluate_trained(train, test, seed=0, log=lambda *a, **k: None,
                                              training_options={**SMOKE, "prior_means": swapped})
    right = cardiac_run.evaluate_trained(train, test, seed=0, log=lambda *a, **k: None, training_options=SMOKE)
    for method in cardiac_run.DEEP:
        name = f"{method} trained on 3, λ = 1"
        wrong, good = _row(evaluation.markdown, name), _row(right.markdown, name)
        assert wrong[9] == "0/1" and float(wrong[2]) < 0.2  # blood Dice as given: the myocardium was called blood
        # trained with the rows as they are: blood and myocardium where they belong (a one-epoch model leaves
        # edema and scar (nearly) empty, so the all-classes identity column says little about it)
        assert float(good[2]) > 0.7 and float(good[3]) > 0.5
        labels = next(runs for v, runs in evaluation.results.items() if v.name == name)[0][1]
        matched = cardiac_run.score(labels, test[0], matched=True)
        assert matched.dice[BLOOD - 1] > 0.7  # matching would have hidden the swap


def test_training_and_evaluated_patients_never_overlap():
    assert cardiac_run.training_split(20, 100, 5, 0, 6) == (tuple(range(100, 120)), tuple(range(5)))
    assert cardiac_run.training_split(0, 100, 5, 0, 6) == ((), ())
    with pytest.raises(ValueError, match="--train-first-seed >= 6"):
        cardiac_run.training_split(20, 3, 5, 0, 6)
    with pytest.raises(ValueError, match="--train-first-seed >= 8"):
        cardiac_run.training_split(2, 7, 8, 0, 6)  # the test cases reach past the per-image ones
    case = cp.generate_case(0, FAST)
    with pytest.raises(ValueError, match="overlap"):
        cardiac_run.evaluate_trained([case], [case], training_options=SMOKE)
    with pytest.raises(SystemExit):
        cardiac_run.main(["--cases", "6", "--train-cases", "20", "--train-first-seed", "4"])


def test_make_evaluate_asks_for_the_trained_rows():
    import json

    from DeepGMMSegmentLib.options import TrainingSettings
    from evaluation import run

    def option(arguments, name):
        return arguments[arguments.index(name) + 1]

    full, quick = run.cardiac_arguments(quick=False), run.cardiac_arguments(quick=True)
    assert option(full, "--train-cases") == "20" and option(full, "--test-cases") == "5"
    assert "--training-options" not in full  # the full run trains with cardiac_run.TRAINING_OPTIONS
    assert option(quick, "--train-cases") == "3" and option(quick, "--test-cases") == "1"
    smoke = json.loads(option(quick, "--training-options"))
    assert TrainingSettings().replace(**smoke).max_epochs == 2
    for arguments in (full, quick):
        cases = int(option(arguments, "--cases"))
        train, test = cardiac_run.training_split(int(option(arguments, "--train-cases")), cardiac_run.TRAIN_FIRST_SEED,
                                                 int(option(arguments, "--test-cases")), 0, cases)
        assert test == tuple(range(len(test))) and len(test) <= cases  # the per-image rows' first patients


def test_goals_table_scores_the_default_method_against_the_oracle():
    """The issue-12 goals table compares the deepsvg rows with the oracle rows and with each other."""
    from evaluation import cardiac_phantom, cardiac_run
    case = cardiac_phantom.generate_case(0)
    assert case.has_infarct
    oracle = cardiac_run.run_variant(cardiac_run.Variant("oracle", True), case, 0)
    smooth = cardiac_run.run_variant(cardiac_run.Variant("oracle + smoothing", True), case, 0)
    truth = case.labels.copy()
    no_scar = np.where(truth == 4, 2, truth).astype(np.uint8)  # the scar lost to the myocardium
    swapped = truth.copy()
    swapped[truth == 1], swapped[truth == 4] = 4, 1  # seeds that named blood "scar"

    def table(free, seeded):
        rows = {"oracle": oracle, "oracle + smoothing": smooth, "deepsvg": free, "em-gmm": oracle,
                "sklearn GaussianMixture (n_init=10)": oracle, "deepsvg + seeds": seeded}
        return "\n".join(cardiac_run.goals_table({cardiac_run.Variant(n, True): [(case, lab)]
                                                  for n, lab in rows.items()}, 1))

    perfect = table(truth, truth).splitlines()
    assert [line.rsplit("|", 2)[1].strip() for line in perfect if line.startswith("| ")][1:] == \
        ["met", "met", "met", "missed by 0.100"]  # the seeds cannot add scar Dice to a perfect free run
    gained = table(no_scar, truth)
    assert "| seeds: scar Dice at least 0.1 above no seeds (0.000) | 1.000 | met |" in gained
    wrong = table(truth, swapped)
    assert "seeds: at least the oracle without smoothing" in wrong
    assert wrong.count("missed by") == 2
