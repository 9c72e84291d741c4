"""The per-image deep fit's start ("em" / "em-head"), its network grid and its stopping rule (real torch, CPU)."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from phantoms import blob_phantom, matched_dice

from DeepGMMSegmentLib import segment
from DeepGMMSegmentLib.core import deep
from DeepGMMSegmentLib.core.deep import _cannot_catch_up, _stalled, network_grid_factors, pool_in_mask, smooth_in_mask, start_logits
from DeepGMMSegmentLib.options import DeepSettings, TrainingSettings

FAST = dict(depth=2, base_width=4, precision="float32", max_iter=25, min_iter=25)


def test_grid_keeps_small_crops_and_pools_large_ones_by_powers_of_two():
    assert network_grid_factors((90, 110, 90), 3, False, 2**20) == (1, 1, 1)
    assert network_grid_factors((180, 220, 180), 3, False, 2**20) == (2, 2, 2)  # 7.1 M -> 891,000
    assert network_grid_factors((180, 220, 180), 3, False, 0) == (1, 1, 1)  # 0: full resolution
    # thick slices and the per-slice network never pool across slices
    assert network_grid_factors((40, 512, 512), 3, True, 2**20) == (1, 4, 4)  # 10.5 M -> 655,360
    assert network_grid_factors((40, 512, 512), 2, False, 2**17)[0] == 1
    # an axis keeps at least 16 voxels even when the budget cannot be met
    assert network_grid_factors((20, 40, 40), 3, False, 10) == (1, 2, 2)


def test_smoothing_inside_the_mask_keeps_constants_and_ignores_outside_voxels():
    mask = torch.zeros(6, 9, 9, dtype=torch.bool)
    mask[1:5, 2:7, 2:7] = True
    values = torch.full((2, 6, 9, 9), 0.25)
    values[:, ~mask] = 100.0  # must not leak in
    out = smooth_in_mask(values, mask, (1.0, 1.0, 1.0))
    assert torch.allclose(out[:, mask], torch.full_like(out[:, mask], 0.25), atol=1e-6)
    spike = torch.zeros(1, 6, 9, 9)
    spike[0, 3, 4, 4] = 1.0
    blurred = smooth_in_mask(spike, mask, (0.0, 1.0, 1.0))  # sigma 0 along z: no mixing across slices
    assert blurred[0, 2].abs().max() == 0 and blurred[0, 3, 4, 4] < 1.0 and blurred[0, 3, 4, 5] > 0


def test_start_logits_reproduce_the_start_labels_and_are_floored():
    mask = torch.ones(8, 8, dtype=torch.bool)
    labels = torch.zeros(8, 8, dtype=torch.long)
    labels[:, 4:] = 1
    log_resp = torch.log(torch.nn.functional.one_hot(labels[mask], 2).float() * 0.999 + 0.0005)
    logits = start_logits(log_resp, mask, sigma=0.0)
    assert logits.shape == (1, 2, 8, 8)
    assert torch.equal(logits[0].argmax(0), labels)
    assert float(logits.min()) >= np.log(1e-2) - 1e-6  # START_FLOOR: a finite correction can overturn a label


def test_stopping_rule_needs_a_whole_window_without_progress():
    falling = [1.0 - 0.01 * i for i in range(30)]
    assert not _stalled(falling, 1e-4)
    flat = falling + [falling[-1]] * 10
    assert _stalled(flat, 1e-4)
    # one flat step inside a falling run does not stop an em-head fit (a one-step rule would)
    assert not _stalled(falling[:20] + [falling[19]] + falling[20:], 1e-4)


def test_a_fit_is_given_up_only_when_its_recent_pace_cannot_reach_the_start_in_the_steps_left():
    slow = [1.10 - 0.001 * i for i in range(30)]  # 0.071 behind the start at 1.0, 0.001 per step
    assert _cannot_catch_up(slow, 1.0, steps_left=50)
    assert not _cannot_catch_up(slow, 1.0, steps_left=100)  # at this pace 71 steps would do
    assert not _cannot_catch_up(slow, 1.2, steps_left=1)  # already ahead of the start
    assert not _cannot_catch_up(slow[:10], 1.0, steps_left=1)  # not a whole window yet
    assert not _cannot_catch_up(slow, 1.0, steps_left=0)  # the last step: nothing to stop early
    # Adam's ups and downs: the pace is the best value's, so a bad last step changes nothing
    assert _cannot_catch_up(slow + [1.5], 1.0, steps_left=50) == _cannot_catch_up(slow, 1.0, steps_left=50)
    flat = slow + [slow[-1] + 0.01] * 10  # no new best in a whole window: nothing left to wait for
    assert _cannot_catch_up(flat, 1.0, steps_left=10_000)


def test_em_head_starts_at_the_em_solution_without_distillation():
    channels, truth, _ = blob_phantom((40, 40), n_classes=3, n_channels=2, noise=0.15, seed=3)
    em = segment(channels, 3, method="em-gmm", seed=0)
    head = segment(channels, 3, method="deepsvg", seed=0, warm_start="em-head", **FAST)
    assert head.n_iter <= FAST["max_iter"]  # no distillation steps in front
    assert (head.labels == em.labels).mean() > 0.9
    assert matched_dice(head.labels, truth, 3) > matched_dice(em.labels, truth, 3) - 0.02


def test_pooled_network_grid_still_labels_every_voxel():
    channels, truth, _ = blob_phantom((24, 64, 64), n_classes=3, n_channels=1, noise=0.15, seed=4)
    result = segment(channels, 3, method="deepsvg", seed=0, warm_start="em-head", max_network_voxels=2**12, **FAST)
    assert result.labels.shape == truth.shape and result.labels.min() >= 1
    assert matched_dice(result.labels, truth, 3) > 0.85


def test_pooling_in_the_mask_averages_only_mask_voxels_and_keeps_partial_blocks():
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[:3, :3] = True
    values = torch.arange(30, dtype=torch.float32).reshape(1, 5, 6)
    values[0, ~mask] = 1000.0  # outside the mask: must not enter any block mean
    pooled, coarse = pool_in_mask(values, mask, (2, 2))
    assert pooled.shape == (1, 3, 3) and coarse.tolist() == [[True, True, False], [True, True, False],
                                                             [False, False, False]]
    assert pooled[0, 0, 0].item() == pytest.approx((0 + 1 + 6 + 7) / 4)
    assert pooled[0, 1, 1].item() == pytest.approx(14.0)  # a partial block: its one mask voxel
    assert pooled[0, 0, 1].item() == pytest.approx((2 + 8) / 2)
    assert float(pooled[0][~coarse].abs().max()) == 0.0


def test_pooled_start_keeps_probabilities_and_seeds_keep_their_class():
    mask = torch.ones(4, 4, dtype=torch.bool)
    labels = torch.zeros(4, 4, dtype=torch.long)
    labels[:, 2:] = 1
    start = torch.log(torch.nn.functional.one_hot(labels[mask], 2).float() * 0.98 + 0.01)
    pooled = deep._pool_start(start, mask, (2, 2), torch.ones(2, 2, dtype=torch.bool))
    assert torch.allclose(pooled.exp().sum(1), torch.ones(4)) and pooled.argmax(1).tolist() == [0, 1, 0, 1]
    seeds = torch.full((4, 4), -1)
    seeds[0, 0], seeds[3, 3], seeds[2, 2], seeds[3, 2] = 1, 0, 1, 1
    assert deep._pool_labels(seeds, 2, (2, 2)).tolist() == [[1, -1], [-1, 1]]  # the block's majority


def test_coarse_to_fine_fit_runs_on_the_pooled_grid_then_steps_at_full_resolution():
    channels, truth, _ = blob_phantom((24, 64, 64), n_classes=3, n_channels=1, noise=0.15, seed=4)
    steps = []
    # loss_grid="voxels": the fine phase's loss on every voxel ("network" is tested in test_loss_grid.py)
    common = dict(method="deepsvg", seed=0, max_network_voxels=2**13, loss_grid="voxels", **FAST)
    result = segment(channels, 3, warm_start_iter=10, full_resolution_iter=5,
                     progress=lambda i, n, *_: steps.append((i, n)), **common)
    assert steps[-1] == (result.n_iter, 10 + 25 + 5) and result.n_iter >= 25 + 5
    assert result.labels.shape == truth.shape and result.labels.min() >= 1
    assert matched_dice(result.labels, truth, 3) > 0.85
    # cold starts, so that no guard hands back the EM start in place of either fit
    cold = segment(channels, 3, warm_start="none", full_resolution_iter=5, **common)
    coarse_only = segment(channels, 3, warm_start="none", full_resolution_iter=0, **common)
    assert cold.n_iter == coarse_only.n_iter + 5 == 25 + 5  # FAST's min_iter: the coarse fit runs all its steps
    assert not np.allclose(cold.probabilities, coarse_only.probabilities, atol=1e-3)


def test_a_crop_above_the_coarse_budget_is_fitted_coarse_then_with_the_network_at_full_resolution(monkeypatch):
    from DeepGMMSegmentLib.core.networks import UNet
    channels, truth, _ = blob_phantom((24, 64, 64), n_classes=3, n_channels=1, noise=0.15, seed=4)
    grids = []  # the spatial shape of every network input, in order
    forward = UNet.forward

    def spy(self, x):
        grids.append(tuple(x.shape[2:]))
        return forward(self, x)

    monkeypatch.setattr(UNet, "forward", spy)
    # "all": the fine phase runs the whole network every step ("last", the default here, is tested below)
    fast = {**FAST, "max_iter": 5, "min_iter": 5, "full_resolution_layers": "all"}
    result = segment(channels, 3, method="deepsvg", seed=0, coarse_network_voxels=2**13, warm_start_iter=3,
                     full_resolution_iter=4, **fast)
    full = truth.shape
    coarse = grids[0]
    assert math.prod(coarse) < math.prod(full)
    # distillation + NLL steps + the phase's last look on the pooled grid, then the fine steps and the
    # last look with the same network on the crop itself (below max_network_voxels)
    assert grids == [coarse] * (3 + 5 + 1) + [full] * (4 + 1)
    assert result.labels.shape == full and matched_dice(result.labels, truth, 3) > 0.85
    grids.clear()
    segment(channels, 3, method="deepsvg", seed=0, coarse_network_voxels=0, warm_start_iter=3,
            full_resolution_iter=4, **fast)
    assert set(grids) == {full}  # 0: no coarse phase below max_network_voxels, as before the option
    grids.clear()
    segment(channels, 3, method="deepg", seed=0, coarse_network_voxels=2**13, warm_start_iter=3,
            full_resolution_iter=4, **fast)
    slices = grids[0]  # deepg's per-slice network: pooled in-plane only, then the slices themselves
    assert slices[0] < full[1] and slices[1] < full[2] and grids[-1] == full[1:]
    assert DeepSettings().coarse_network_voxels is None
    grids.clear()
    # both budgets below the crop: the network stays on the pooled grid of max_network_voxels for
    # the fine phase, and the coarse phase is coarser still
    segment(channels, 3, method="deepsvg", seed=0, coarse_network_voxels=2**13, max_network_voxels=2**15,
            loss_grid="voxels", warm_start_iter=3, full_resolution_iter=4, **fast)
    assert grids[0] == coarse and grids[-1] == (24, 32, 32)  # 24,576 voxels: within 2**15, not 2**13
    # em-head adds the start's logits: on the network's new grid too
    head = segment(channels, 3, method="deepsvg", seed=0, coarse_network_voxels=2**13, max_network_voxels=2**15,
                   loss_grid="voxels", warm_start="em-head", full_resolution_iter=4, **fast)
    assert matched_dice(head.labels, truth, 3) > 0.85


def test_the_fine_phase_trains_only_the_last_level_on_features_computed_once(monkeypatch):
    from DeepGMMSegmentLib.core.networks import UNet
    channels, truth, _ = blob_phantom((24, 64, 64), n_classes=3, n_channels=1, noise=0.15, seed=4)
    calls = []  # (network, input grid, its weights then) of every pass up to the last level
    to_last_level = UNet.to_last_level

    def spy(self, x):
        calls.append((self, tuple(x.shape[2:]), {k: v.detach().clone() for k, v in self.state_dict().items()}))
        return to_last_level(self, x)

    monkeypatch.setattr(UNet, "to_last_level", spy)
    fast = {**FAST, "max_iter": 5, "min_iter": 5}
    common = dict(method="deepsvg", seed=0, coarse_network_voxels=2**13, warm_start="none", full_resolution_iter=4,
                  **fast)
    result = segment(channels, 3, **common)
    assert DeepSettings().full_resolution_layers == "auto"  # "last" where the network reaches the crop's grid
    at_full = [c for c in calls if c[1] == truth.shape]
    assert len(at_full) == 1  # the fine phase's features, computed once; its 4 steps and last look reuse them
    network, _, before = at_full[0]
    after = network.state_dict()
    trained = {k for k in after if not torch.equal(after[k], before[k])}
    last_block = f"up.{len(network.up) - 1}."
    assert trained and all(k.startswith((last_block, "head.")) for k in trained), trained
    assert any(k.startswith(last_block) for k in trained) and any(k.startswith("head.") for k in trained)
    assert matched_dice(result.labels, truth, 3) > 0.85
    calls.clear()
    segment(channels, 3, full_resolution_layers="all", **common)
    assert len([c for c in calls if c[1] == truth.shape]) == 4 + 1  # "all": the whole network every step


def test_the_fine_phase_is_short_when_the_network_reaches_full_resolution_and_long_when_it_stays_pooled():
    from DeepGMMSegmentLib.options import FULL_RESOLUTION_ITER, WARM_START_SCHEDULE
    from DeepGMMSegmentLib.result import SegmentationCancelled
    channels, _, _ = blob_phantom((24, 64, 64), n_classes=3, n_channels=1, noise=0.15, seed=4)
    for max_network_voxels, grid in ((2**20, "network at full resolution"), (2**15, "network pooled")):
        totals = []

        def stop_at_once(iteration, total, *_):
            totals.append(total)
            return False

        with pytest.raises(SegmentationCancelled):
            segment(channels, 3, method="deepsvg", seed=0, coarse_network_voxels=2**13,
                    max_network_voxels=max_network_voxels, loss_grid="voxels", progress=stop_at_once,
                    **{**FAST, "max_iter": 5})
        assert totals[0] == WARM_START_SCHEDULE["free"][0] + 5 + FULL_RESOLUTION_ITER["deepsvg"][grid], (grid, totals)


def test_a_coarse_to_fine_fit_reports_whether_its_coarse_phase_converged():
    # the fine phase runs a fixed number of steps: "converged" is the coarse phase's stopping rule
    channels, _, _ = blob_phantom((24, 64, 64), n_classes=3, n_channels=1, noise=0.15, seed=4)
    common = dict(method="deepsvg", seed=0, coarse_network_voxels=2**13, warm_start_iter=3, full_resolution_iter=3,
                  depth=2, base_width=4, precision="float32", min_iter=2)
    stopped = segment(channels, 3, max_iter=300, **common)
    assert stopped.converged and stopped.n_iter < 3 + 300 + 3  # the rule ended the coarse phase early
    cut = segment(channels, 3, max_iter=2, tol=0.0, **common)
    assert not cut.converged and cut.n_iter == 3 + 2 + 3


def test_only_the_full_resolution_phase_chooses_and_reports_the_result():
    # a coarse phase too short to beat its start: its result is discarded, so it must not say it
    # returned the start; only the full-resolution phase chooses (and notes) what is returned
    channels, _, _ = blob_phantom((24, 64, 64), n_classes=3, n_channels=1, noise=0.15, seed=4)
    result = segment(channels, 3, method="deepsvg", seed=0, max_network_voxels=2**13, loss_grid="voxels",
                     warm_start_iter=2, full_resolution_iter=2, depth=2, base_width=4, precision="float32", max_iter=1,
                     min_iter=1)
    assert sum("returning" in note for note in result.notes) <= 1, result.notes


def test_training_refuses_the_per_image_head_start():
    from DeepGMMSegmentLib.trained import training
    with pytest.raises(ValueError, match="em-head"):
        training._checked_settings(TrainingSettings(warm_start="em-head"))


def test_settings_validate_the_new_choices():
    from DeepGMMSegmentLib.options import resolve_options
    with pytest.raises(ValueError, match="warm_start"):
        resolve_options("deepsvg", warm_start="distillation")
    with pytest.raises(ValueError, match="max_network_voxels"):
        resolve_options("deepsvg", max_network_voxels=-1)
    with pytest.raises(ValueError, match="coarse_network_voxels must be"):
        resolve_options("deepsvg", coarse_network_voxels=-1)
    with pytest.raises(ValueError, match="full_resolution_iter must be an integer >= 0 or one of 'auto'"):
        resolve_options("deepsvg", full_resolution_iter="long")
    with pytest.raises(ValueError, match="full_resolution_layers must be one of 'auto', 'last', 'all'"):
        resolve_options("deepsvg", full_resolution_layers="head")
    assert DeepSettings().max_network_voxels == 2**20


@pytest.mark.parametrize("distil_rate", [None, 0.05])
def test_the_distillation_runs_at_its_own_rate_and_the_nll_steps_at_the_fit_rate(monkeypatch, distil_rate):
    channels, _, _ = blob_phantom((24, 24), n_classes=3, n_channels=1, noise=0.15, seed=1)
    stepped = []  # the optimiser of every training step, in order
    step = deep._Guard.step

    def spy_step(self, loss, optimiser):
        stepped.append((optimiser, optimiser.lr))
        return step(self, loss, optimiser)

    monkeypatch.setattr(deep._Guard, "step", spy_step)
    segment(channels, 3, method="deepsvg", seed=0, warm_start_iter=3, warm_start_learning_rate=distil_rate,
            learning_rate=0.02, warm_start_agreement=1.0, warm_start_gap=0.0, **{**FAST, "max_iter": 3, "min_iter": 3})
    assert len(stepped) == 3 + 3  # three distillation steps, then three NLL steps
    distillation, nll_steps = stepped[:3], stepped[3:]
    assert {id(o) for o, _ in distillation} == {id(distillation[0][0])}
    assert {lr for _, lr in distillation} == {0.02 if distil_rate is None else distil_rate}
    assert {lr for _, lr in nll_steps} == {0.02}
    if distil_rate is None:
        assert all(o is distillation[0][0] for o, _ in nll_steps)  # one Adam throughout, as before the option
    else:
        # a fresh Adam for the NLL: no moment estimates carried over from the distillation's loss
        assert all(o is nll_steps[0][0] for o, _ in nll_steps) and nll_steps[0][0] is not distillation[0][0]


def test_auto_distillation_is_short_and_fast_for_free_fits_and_the_old_one_for_anchored_fits():
    from DeepGMMSegmentLib.options import WARM_START_SCHEDULE, resolve_warm_start
    from DeepGMMSegmentLib.result import SegmentationCancelled
    assert resolve_warm_start(DeepSettings(), anchored=False).warm_start_iter == WARM_START_SCHEDULE["free"][0]
    anchored = resolve_warm_start(DeepSettings(), anchored=True)
    assert (anchored.warm_start_iter, anchored.warm_start_learning_rate) == WARM_START_SCHEDULE["anchored"]
    given = resolve_warm_start(DeepSettings(warm_start_iter=7, warm_start_learning_rate=None), anchored=False)
    assert (given.warm_start_iter, given.warm_start_learning_rate) == (7, None)  # what the caller gave stays
    channels, _, _ = blob_phantom((24, 24), n_classes=2, n_channels=1, noise=0.15, seed=1)
    anchors = np.quantile(np.asarray(channels), [0.2, 0.8])[:, None]  # (K, C) prior means in input units
    for prior_means, schedule in ((None, "free"), (anchors, "anchored")):
        totals = []

        def stop_at_once(iteration, total, *_):
            totals.append(total)
            return False

        with pytest.raises(SegmentationCancelled):
            segment(channels, 2, method="deepsvg", seed=0, prior_means=prior_means, progress=stop_at_once,
                    **{**FAST, "max_iter": 5, "min_iter": 5})
        assert totals[0] == WARM_START_SCHEDULE[schedule][0] + 5, (schedule, totals)


def test_the_distillation_options_are_validated():
    channels, _, _ = blob_phantom((24, 24), n_classes=2, n_channels=1, noise=0.15, seed=1)
    expected = r"warm_start_learning_rate must be a number > 0 or one of 'auto' \(or None: the fit's own Adam"
    with pytest.raises(ValueError, match=expected):
        segment(channels, 2, method="deepsvg", warm_start_learning_rate=0)
    with pytest.raises(ValueError, match="warm_start_iter must be"):
        segment(channels, 2, method="deepsvg", warm_start_iter="fast")


def test_a_distillation_that_stops_at_its_cap_is_logged_not_warned(caplog, recwarn):
    # The free schedule caps the distillation on purpose, so ending there is no news for the user:
    # no warning and no result note, but the log says how far it got.
    import logging
    channels, _, _ = blob_phantom((24, 24), n_classes=3, n_channels=1, noise=0.15, seed=1)
    with caplog.at_level(logging.INFO, logger="DeepGMMSegmentLib.core.deep"):
        result = segment(channels, 3, method="deepsvg", seed=0, warm_start_iter=2, warm_start_agreement=1.0,
                         warm_start_gap=0.0, **{**FAST, "max_iter": 2, "min_iter": 2})
    about_distillation = [text for text in [str(w.message) for w in recwarn] + list(result.notes)
                          if "warm_start_iter" in text or "reproduce" in text]
    assert about_distillation == []
    assert any("Stopped distilling the EM start" in r.getMessage() and "warm_start_iter=2 reached" in r.getMessage()
               for r in caplog.records)


def test_grid_plan_of_a_2_mm_and_a_1_mm_brain_and_of_deepg():
    from DeepGMMSegmentLib.core.deep import grid_plan
    settings = DeepSettings()
    # a 2 mm brain crop (614,400 voxels: above 2^17, below 2^20) -> 4 mm blocks, then the crop itself, 30 steps
    assert grid_plan((80, 96, 80), 3, False, settings, "deepsvg") == ((2, 2, 2), (1, 1, 1), 30, "last")
    # a 1 mm brain crop (4.5 M voxels, above 2^20) -> 4 mm blocks, then the network on 2 mm blocks, 60 steps
    assert grid_plan((160, 200, 140), 3, False, settings, "deepsvg") == ((4, 4, 4), (2, 2, 2), 60, "all")
    assert grid_plan((80, 96, 80), 3, False, dataclasses.replace(settings, full_resolution_iter=7), "deepsvg")[2] == 7
    assert grid_plan((160, 200, 140), 3, False, dataclasses.replace(settings, full_resolution_layers="last"),
                     "deepsvg").fine_layers == "last"
    # deepg's per-slice network pools in-plane only: 2 mm slices in blocks of 4 x 4, then the slices
    # themselves (30 steps of the last level); a 1 mm brain: 8 x 8, then 4 x 4 with the whole network,
    # 30 steps where deepsvg takes 60
    assert grid_plan((80, 96, 80), 2, False, settings, "deepg") == ((1, 4, 4), (1, 1, 1), 30, "last")
    assert grid_plan((160, 200, 140), 2, False, settings, "deepg") == ((1, 8, 8), (1, 4, 4), 30, "all")
    # a given (trained) network: its crop, one phase
    assert grid_plan((160, 200, 140), 3, False, settings, "deepsvg", fresh=False) == ((1, 1, 1), (1, 1, 1), 0, "all")
    # a crop below the coarse budget: one phase, no fine steps
    assert grid_plan((8, 50, 50), 3, True, settings, "deepsvg") == ((1, 1, 1), (1, 1, 1), 0, "all")
