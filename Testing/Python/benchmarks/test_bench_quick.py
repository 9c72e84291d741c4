"""The engine benchmark's deep parts on their --quick inputs, so that `make benchmark` cannot rot.

No timing is asserted (the figures come from a quiet machine, docs/benchmarks.md); these check that
every worker runs, scores and reports, that the baseline engine really is the one imported, and that
the page and its plot are written.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import bench_deep
import bench_engine


def test_quick_inputs_hold_a_reference_in_their_mask_and_dice_scores_it():
    for name in bench_deep.DEEP_INPUTS:
        inp = bench_deep.load_input(name, quick=True)
        assert all(channel.shape == inp.mask.shape for channel in inp.channels), name
        assert set(np.unique(inp.reference[inp.mask])) <= set(range(1, inp.n_classes + 1)), name
        assert (inp.reference[~inp.mask] == 0).all() and inp.mask.sum() > 1000, name
        assert bench_deep.mean_dice(inp.reference, inp)[0] == pytest.approx(1.0), name
        # Hungarian matching: cluster numbers carry no meaning
        permuted = np.where(inp.mask, inp.n_classes + 1 - inp.reference, 0)
        assert bench_deep.mean_dice(permuted, inp)[0] == pytest.approx(1.0), name
    one_class = np.where(inp.mask, 1, 0)
    assert bench_deep.mean_dice(one_class, inp)[0] < 0.6


def test_scaling_inputs_hold_about_the_voxels_asked_for_and_do_not_compress():
    sizes = []
    for target in bench_deep.QUICK_SCALING_TARGETS:
        t1, mask, spacing = bench_deep.scaling_input(target, quick=True)
        assert t1.shape == mask.shape and len(spacing) == 3
        assert 0.7 * target < mask.sum() < 1.3 * target
        assert np.unique(t1[mask]).size > 0.9 * mask.sum()  # the noise leaves (almost) no repeated value
        sizes.append(mask.sum())
    assert sizes == sorted(sizes)


def test_loglog_slope_is_the_growth_exponent():
    voxels = np.array([1e4, 1e5, 1e6])
    assert bench_deep.loglog_slope(voxels, 3e-6 * voxels) == pytest.approx(1.0)
    assert bench_deep.loglog_slope(voxels, 0.01 * voxels ** 0.5) == pytest.approx(0.5)


def test_baseline_engine_is_extracted_and_imported_in_place_of_this_trees(tmp_path):
    try:
        head = bench_deep.resolve_commit("HEAD")
    except (ValueError, OSError):
        pytest.skip("not a git checkout: no commit to extract")
    engine = bench_deep.extract_engine(head, tmp_path)
    assert (engine / "DeepGMMSegmentLib" / "engine.py").is_file()
    result = bench_deep.run_case({"worker": "fit", "input": "cardiac", "quick": True}, engine)
    assert "error" not in result, result.get("error")
    assert result["engine"].startswith(str(engine.resolve()))
    assert 0 <= result["dice"] <= 1 and result["n_iter"] >= 1
    failing = bench_deep.run_case({"worker": "fit", "input": "no-such-input", "quick": True})
    assert "Unknown benchmark input 'no-such-input'" in failing["error"]  # reported, not raised
    with pytest.raises(ValueError, match="not a commit"):
        bench_deep.resolve_commit("no-such-ref-anywhere")


def test_quick_workers_feed_the_page_with_goals_and_plot(tmp_path):
    spec = {"quick": True}
    fit = bench_deep.worker_fit(dict(spec, worker="fit", input="cardiac"))
    model = str(tmp_path / "model.pt")
    training = bench_deep.worker_train(dict(spec, worker="train", model=model))
    inference = bench_deep.worker_inference(dict(spec, worker="inference", model=model))
    scaling = {method: [bench_deep.worker_scaling(dict(spec, worker="scaling", method=method, target=target))
                        for target in bench_deep.QUICK_SCALING_TARGETS] for method in bench_deep.SCALING_METHODS}
    for run in (fit, inference):
        assert 0 <= run["dice"] <= 1 and run["seconds"] > 0 and run["peak_mib"] >= 0
    assert training["epochs"] == 1 and inference["n_iter"] == 1  # one forward pass
    assert [p["mask_voxels"] for p in scaling["deepsvg"]] == [p["mask_voxels"] for p in scaling["em-gmm"]]

    results = {"quick": True, "after_version": "test", "before_version": "HEAD (test)",
               "fits": {"cardiac": {"after": fit, "before": dict(fit, seconds=2 * fit["seconds"])},
                        "mni-1mm": {"after": {"error": "boom"}}},
               "trained": {"after": {"training": training, "inference": inference}}, "scaling": scaling,
               "baseline_skipped": ["mni-1mm"]}
    page = tmp_path / "benchmarks.md"
    image = tmp_path / "images" / "benchmark-scaling.png"
    console, markdown = bench_engine.build_report({}, None, results, None, bench_engine.machine_description(),
                                                  ((0.0,) * 3, (0.0,) * 3), "today", image, page,
                                                  quick=True)
    assert image.read_bytes().startswith(b"\x89PNG")
    assert "![fit time against mask voxels](images/benchmark-scaling.png)" in markdown
    assert "Quick run" in markdown
    assert "2.0× faster than before in wall time" in markdown
    assert "goal ≤ 1.5 s (" in markdown and "mni-1mm: no result of this tree's engine" in markdown
    assert "after failed: boom" in markdown
    assert "The before engine was not run on mni-1mm in this run (`--baseline-skip`)" in markdown
    assert "Goal (issue 10): trained-model inference at MNI 1 mm ≤ 2 s" in markdown
    assert markdown.count("fitted log-log slope") == 2
    cardiac = next(line for line in markdown.splitlines() if line.startswith("* cardiac:"))
    assert cardiac.count("met") == 2 and "(met: equal at three decimals or better)" in cardiac  # time goal, then Dice (equal here)
    assert "deepSVG per-image fits" in console
    import torch
    from DeepGMMSegmentLib.core.networks import resolve_precision
    native = resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    precision = next(line for line in markdown.splitlines() if line.startswith("* The deep fits' convolutions"))
    assert ("bfloat16 (native)" in precision) == native and ("float32 (no native" in precision) != native
    assert "widest vector extension: " in precision

    # the raw results a run saves render the same page again without measuring
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps({"info": {}, "em": None, "deep": results, "compute": None,
                                 "machine": bench_engine.machine_description(), "load": [[0.0] * 3] * 2,
                                 "date": "today", "quick": True}))
    again = tmp_path / "again" / "benchmarks.md"
    assert bench_engine.main(["--from-results", str(saved), "--output", str(again)]) == 0
    assert again.read_text() == markdown + "\n"
    assert (again.parent / "images" / "benchmark-scaling.png").is_file()


def test_bad_baseline_ref_fails_before_any_case_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        bench_engine.main(["--quick", "--baseline-ref", "no-such-ref-anywhere", "--output", str(tmp_path / "x.md")])
    assert stop.value.code == 2
    assert "--baseline-ref 'no-such-ref-anywhere' is not a commit" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()


def test_gpu_check_table_compares_the_device_with_the_cpu(capsys):
    # gpu_check.sh runs this on cuda; on the CPU the code path is the same, the agreement then 1.
    status = bench_deep.gpu_check("cpu", budget_seconds=300, quick=True, inputs=("cardiac",))
    table = capsys.readouterr().out.splitlines()
    row = next(line for line in table if line.startswith("cardiac "))
    assert status == 0 and "GPU~CPU" in table[-2]
    assert row.split()[-1] == "1.000"  # same device, same seed: identical label maps


def test_compute_use_takes_the_workers_own_full_resolution_timing_and_falls_back_for_old_results():
    deep = {"fits": {"mni-2mm": {"after": {"seconds_per_iteration": 0.1}}}}
    compute = {"flops_per_iteration": 50e9, "matmul_flops_per_second": 200e9, "torch_threads": 2}
    _, md = bench_engine.compute_report({**compute, "seconds_per_iteration": 0.5}, deep)
    page = "\n".join(md)
    # 50 GFLOP in 0.5 s = 100 GFLOP/s = half the matmul's rate; (b)'s mixed coarse/fine average is not used
    assert "an 8- and a 3-iteration fit in this worker) | 0.500 s" in page and "**50.0%**" in page
    _, md = bench_engine.compute_report(compute, deep)  # results saved before the worker timed itself
    assert "the 2 mm fit of (b), after) | 0.100 s" in "\n".join(md)


def test_an_unknown_baseline_skip_input_fails_before_any_case_runs(tmp_path):
    with pytest.raises(SystemExit):
        bench_engine.main(["--quick", "--baseline-skip", "mni-3mm", "--output", str(tmp_path / "x.md")])
    assert not (tmp_path / "x.md").exists()
