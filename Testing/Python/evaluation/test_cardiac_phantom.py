"""The synthetic cardiac phantom, its supervised oracle and the simulated seed strokes."""

import numpy as np
import pytest
from scipy import ndimage

from evaluation import cardiac_oracle, cardiac_phantom as cp, cardiac_run, metrics

# Smaller and coarser than the evaluation's cases (128 px, 3x supersampling) to stay fast.
FAST = cp.PhantomSettings(size=104, supersampling=2, n_slices=(6, 8))
BLOOD, MYOCARDIUM, EDEMA, SCAR = 1, 2, 3, 4


@pytest.fixture(scope="module")
def cohort():
    return cp.generate_cohort(6, first_seed=0, settings=FAST)


def test_same_seed_same_case_other_seed_other_case(cohort):
    a, b = cohort[2], cp.generate_case(2, FAST)
    np.testing.assert_array_equal(a.channels, b.channels)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.spacing == b.spacing and a.seed == 2
    other = cohort[3]
    assert other.channels.shape != a.channels.shape or not np.array_equal(other.channels, a.channels)


def test_case_layout_scanner_units_and_thick_slices(cohort):
    for case in cohort:
        assert case.synthetic and case.channel_names == ("LGE", "T2", "bSSFP")
        assert case.channels.dtype == np.int16 and case.channels.shape == (3,) + case.labels.shape
        thickness, dy, dx = case.spacing
        assert 8 <= thickness <= 10 and 1.25 <= dy == dx <= 1.5
        np.testing.assert_array_equal(case.mask, case.labels > 0)
        assert case.channels.min() >= 0
    # the sequences come in different units: the SD of the whole crop differs by several times
    spreads = np.array([[c.channels[s].std() for s in range(3)] for c in cohort])
    assert (spreads[:, 2] > 3 * spreads[:, 1]).all()


def test_lv_shrinks_from_base_to_apex(cohort):
    for case in cohort:
        area = case.mask.sum(axis=(1, 2))
        assert area[-1] < 0.6 * area.max() and area.argmax() <= 2  # apex small, the widest near the base
        blood = (case.labels == BLOOD).sum(axis=(1, 2))
        assert blood[0] > 0 and blood[-1] < 0.5 * blood[0]


def test_infarct_and_no_infarct_cases_and_slices(cohort):
    with_infarct = [c for c in cohort if c.has_infarct]
    assert with_infarct and len(with_infarct) < len(cohort)
    for case in cohort:
        present = set(np.unique(case.labels)) - {0}
        assert present == ({BLOOD, MYOCARDIUM, EDEMA, SCAR} if case.has_infarct else {BLOOD, MYOCARDIUM})
    assert any(len(c.infarct_slices) < c.labels.shape[0] for c in with_infarct)  # slices with no infarct too
    none = cp.generate_case(0, cp.PhantomSettings(size=104, supersampling=2, n_slices=(6, 8), p_no_infarct=1.0))
    assert not none.has_infarct and none.labels.max() == MYOCARDIUM


def _angles(region, centre):
    y, x = np.nonzero(region)
    return np.arctan2(y - centre[0], x - centre[1])


def test_scar_inside_edema_region_inside_the_myocardial_ring(cohort):
    for case in (c for c in cohort if c.has_infarct):
        scar_slices = set(case.infarct_slices)
        edema_slices = set(np.flatnonzero((case.labels == EDEMA).any(axis=(1, 2))))
        assert scar_slices <= edema_slices  # the area at risk reaches further along the axis
        assert scar_slices == set(range(min(scar_slices), max(scar_slices) + 1))  # one contiguous run
        for k in scar_slices:
            labels = case.labels[k]
            ring = labels >= MYOCARDIUM
            holes = ndimage.binary_fill_holes(ring) & ~ring
            blood = labels == BLOOD
            if blood.sum() > 20:  # the blood pool is the ring's hole: pathology sits in the wall
                assert (blood & holes).sum() >= 0.95 * blood.sum()
            assert (labels == MYOCARDIUM).any()  # some healthy wall is left
            # around the ring, the scar's sector lies within the (wider) scar + edema sector
            centre = np.argwhere(case.mask[k]).mean(0)
            reference = np.angle(np.exp(1j * _angles(labels == SCAR, centre)).mean())
            scar = np.angle(np.exp(1j * (_angles(labels == SCAR, centre) - reference)))
            pathology = np.angle(np.exp(1j * (_angles(labels >= EDEMA, centre) - reference)))
            assert pathology.min() <= scar.min() + 1e-9 and pathology.max() >= scar.max() - 1e-9


def test_crop_zscored_class_intensities_match_mu_data(cohort):
    errors = []
    for case in cohort:
        z = case.crop_zscored()
        # each slice z-scored over its crop: mean 0, SD 1 up to the bias field, clipping and rounding
        assert np.abs(z.mean(axis=(2, 3))).max() < 0.05
        for k in np.unique(case.labels[case.labels > 0]):
            interior = ndimage.binary_erosion(case.labels == k, structure=np.ones((1, 3, 3)))
            region = interior if interior.sum() > 50 else case.labels == k
            means = z[:, region].mean(1)
            np.testing.assert_allclose(means, case.class_means[k - 1], atol=0.35)  # this patient's draw
            errors.append(means - cp.MU_DATA[k - 1])
            sds = z[:, region].std(1)
            np.testing.assert_allclose(sds, cp.SIGMA_DATA[k - 1], atol=0.25)
    # over the cohort the per-patient jitter averages out: close to the published values
    assert np.abs(np.mean(errors, axis=0)).max() < 0.15


def test_prior_means_map_mu_data_into_input_units(cohort):
    case = cohort[0]
    prior = case.prior_means()
    assert prior.shape == (4, 3)
    x = case.channels.reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose((prior - x.mean(1)) / x.std(1), cp.MU_DATA)
    # they land near the true class means in scanner units
    for k in range(1, 5):
        truth = case.channels[:, case.labels == k].mean(1)
        assert (np.abs(prior[k - 1] - truth) < 0.6 * x.std(1)).all()


def _mean_dice(labels, case):
    return np.nanmean(metrics.dice_per_class(labels[case.mask], case.labels[case.mask], 4))


def test_oracle_beats_random_labels_and_smoothing_helps(cohort):
    case = next(c for c in cohort if c.has_infarct)
    rng = np.random.default_rng(0)
    random = np.where(case.mask, rng.integers(1, 5, size=case.mask.shape), 0)
    plain = cardiac_oracle.oracle_labels(case.channels, case.labels, case.mask, 4)
    smoothed = cardiac_oracle.oracle_labels(case.channels, case.labels, case.mask, 4, smoothing_px=1.0)
    assert _mean_dice(plain, case) > _mean_dice(random, case) + 0.3
    assert _mean_dice(smoothed, case) > _mean_dice(plain, case)
    assert (plain[~case.mask] == 0).all() and (plain[case.mask] > 0).all()


def test_oracle_is_near_perfect_without_noise():
    settings = cp.PhantomSettings(size=104, supersampling=2, n_slices=(6, 8), noise_scale=0.0, bias_amplitude=0.0)
    case = next(c for c in (cp.generate_case(s, settings) for s in range(4)) if c.has_infarct)
    labels = cardiac_oracle.oracle_labels(case.channels, case.labels, case.mask, 4)
    dice = metrics.dice_per_class(labels[case.mask], case.labels[case.mask], 4)
    assert dice.min() > 0.9 and dice.mean() > 0.95  # only partial volume is left to get wrong


def test_seed_strokes_cover_at_most_one_percent_and_mark_every_class(cohort):
    for case in cohort:
        strokes = cp.seed_strokes(case.labels, seed=case.seed)
        assert strokes.shape == case.labels.shape and strokes.dtype == np.uint8
        assert np.count_nonzero(strokes) <= 0.01 * case.mask.sum()
        present = set(np.unique(case.labels)) - {0}
        assert set(np.unique(strokes)) - {0} == present
        marked = strokes > 0
        np.testing.assert_array_equal(strokes[marked], case.labels[marked])  # each stroke on its class
        for k in present:  # a few strokes of several voxels each, not single dots
            assert np.count_nonzero(strokes == k) >= 3
        np.testing.assert_array_equal(strokes, cp.seed_strokes(case.labels, seed=case.seed))


def test_seed_strokes_explain_a_too_small_budget():
    labels = np.zeros((1, 10, 10), dtype=np.uint8)
    labels[0, 2:8, 2:8] = 1
    with pytest.raises(ValueError, match="raise it"):
        cp.seed_strokes(labels, seed=0, max_fraction=0.01)


def test_runner_scores_identity_and_myops_unions(cohort):
    case = next(c for c in cohort if c.has_infarct)
    perfect = cardiac_run.score(case.labels, case, matched=False)
    assert perfect.scar == perfect.scar_edema == 1.0 and perfect.identity_ok
    swapped = np.array([0, 1, 2, 4, 3], dtype=np.uint8)[case.labels]  # edema and scar exchanged
    as_given = cardiac_run.score(swapped, case, matched=False)
    assert as_given.scar < 0.5 and as_given.scar_edema == 1.0 and not as_given.identity_ok
    assert cardiac_run.score(swapped, case, matched=True).scar == 1.0
    healthy = next(c for c in cohort if not c.has_infarct)
    invented = np.where(healthy.labels == MYOCARDIUM, SCAR, healthy.labels).astype(np.uint8)
    scores = cardiac_run.score(invented, healthy, matched=False)
    assert scores.invented_scar == pytest.approx((healthy.labels == MYOCARDIUM).sum() / healthy.mask.sum())
    assert np.isnan(scores.scar) and np.isnan(scores.dice[SCAR - 1])


def test_seed_rows_take_class_identity_and_count_from_the_strokes(cohort):
    rows = [v.name for v in cardiac_run.variants(deep=True)]
    assert {f"{m} + seeds" for m in cardiac_run.OUR_METHODS} <= set(rows)
    seeded = cardiac_run.Variant("em-gmm + seeds", True)
    infarct = next(c for c in cohort if c.has_infarct)
    labels = cardiac_run.run_variant(seeded, infarct, seed=0)
    strokes = cardiac_run.case_seeds(infarct)
    np.testing.assert_array_equal(labels[strokes > 0], strokes[strokes > 0])  # painted voxels kept
    scores = cardiac_run.score(labels, infarct, matched=False)
    assert scores.identity_ok and scores.dice[BLOOD - 1] > 0.8  # MyoPS order with no matching
    unseeded = cardiac_run.score(cardiac_run.run_variant(cardiac_run.Variant("em-gmm", False), infarct, 0),
                                 infarct, matched=False)
    assert scores.scar > unseeded.scar + 0.1  # LGE order puts scar and blood together
    healthy = next(c for c in cohort if not c.has_infarct)
    labels = cardiac_run.run_variant(seeded, healthy, seed=0)
    assert labels.max() == MYOCARDIUM  # two tissues painted: K = 2, no scar invented
    assert cardiac_run.score(labels, healthy, matched=False).invented_scar == 0.0


def test_report_tables_add_seconds_per_case_only_when_asked(cohort):
    case = cohort[0]
    rows = {"oracle": [cardiac_run.score(case.labels, case, matched=False)] * 3}
    plain = cardiac_run.table(rows, matched=False)
    timed = cardiac_run.table(rows, matched=False, seconds={"oracle": [1.0, 5.0, 2.0]})
    assert "s per case" not in plain
    assert timed.splitlines()[0].endswith("s per case (median) |") and timed.splitlines()[2].endswith("| 2.0 |")


def test_evaluation_page_carries_the_cardiac_section():
    from evaluation import report
    section = "\n".join(report._cardiac_section("| method | cases |\n|---|---|\n| oracle | 6 |"))
    assert section.startswith("## Cardiac phantom (synthetic)") and "| oracle | 6 |" in section
    assert "SYNTHETIC" in section and "seeds=" in section
    assert "--cardiac-only" in "\n".join(report._cardiac_section(None))
