"""evaluation.job_server: each job a process of its own, forked from a server per library set."""

import json
import os

import numpy as np

from evaluation import run
from evaluation.job_server import JobServers


def _case(tmp_path):
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in (10, 12, 14)], indexing="ij")
    mask = sum(g ** 2 for g in grids) < 0.8
    reference = np.zeros(mask.shape, np.uint8)
    reference[mask] = 1 + np.digitize(grids[0][mask], [-0.3, 0.3])
    channels = (reference.astype(np.float32) * 100.0)[None]
    case = tmp_path / "case.npz"
    np.savez(case, channels=channels, mask=mask, spacing=np.array([1.0, 1.0, 1.0]))
    return case, reference


def test_jobs_run_in_their_own_processes_forked_from_one_server_per_library_set(tmp_path):
    case, reference = _case(tmp_path)
    with JobServers() as servers:
        first = run.run_job(servers, case, "sitk-otsu", tmp_path / "otsu.npz", 3, timeout=120)
        second = run.run_job(servers, case, "sitk-kmeans", tmp_path / "kmeans.npz", 3, timeout=120)
        # both SimpleITK methods import the same libraries: one server forked both jobs
        assert len(servers._servers) == 1
        server = next(iter(servers._servers.values()))
        assert server.poll() is None
        assert servers.run(("SimpleITK",), ["no-such-case.npz", "sitk-otsu", str(tmp_path / "x.npz")],
                           tmp_path / "x.log", timeout=120) != 0
    assert server.poll() == 0  # closing the servers ends them
    for summary, result in ((first, "otsu"), (second, "kmeans")):
        assert "error" not in summary and summary["process_seconds"] >= sum(summary["all_seconds"])
        with np.load(tmp_path / f"{result}.npz") as stored:
            np.testing.assert_array_equal(stored["labels"], reference)
        # the worker's own output went to the job's log, not to the server's answers
        assert json.loads((tmp_path / f"{result}.log").read_text())["method"] == summary["method"]
    assert "no-such-case.npz" in (tmp_path / "x.log").read_text()


def test_a_failing_job_is_reported_with_the_last_line_of_its_log(tmp_path):
    case, _ = _case(tmp_path)
    with JobServers() as servers:
        # SimpleITK's Otsu takes one channel only: the worker fails with the method's own message
        np.savez(case, channels=np.zeros((2, 10, 12, 14), np.float32), mask=np.ones((10, 12, 14), bool),
                 spacing=np.array([1.0, 1.0, 1.0]))
        summary = run.run_job(servers, case, "sitk-otsu", tmp_path / "otsu.npz", 3, timeout=120)
    assert "one channel" in summary["error"]
    assert json.loads((tmp_path / "otsu.json").read_text()) == summary  # kept on disk for --resume
    assert not os.path.exists(tmp_path / "otsu.npz")


def test_a_lost_server_fails_its_job_and_a_new_one_serves_the_next(tmp_path):
    case, reference = _case(tmp_path)
    with JobServers() as servers:
        run.run_job(servers, case, "sitk-otsu", tmp_path / "first.npz", 3, timeout=120)
        lost = next(iter(servers._servers.values()))
        lost.kill()
        lost.wait()
        summary = run.run_job(servers, case, "sitk-otsu", tmp_path / "second.npz", 3, timeout=120)
        assert "job server for SimpleITK ended" in summary["error"]
        summary = run.run_job(servers, case, "sitk-otsu", tmp_path / "third.npz", 3, timeout=120)
        assert "error" not in summary and next(iter(servers._servers.values())) is not lost
    with np.load(tmp_path / "third.npz") as stored:
        np.testing.assert_array_equal(stored["labels"], reference)


def test_the_full_plan_runs_every_deep_method_at_1mm_and_the_n4_pipelines_wherever_a_field_is():
    plan, info = run.build_plan(quick=False)
    assert info == {"quick": False}
    by_case = {(resolution, case.name): names for _, resolution, case, _, names in plan}
    conditions_1mm = [name for resolution, name in by_case if resolution == "1 mm"]
    assert len(conditions_1mm) == 6
    for (resolution, name), names in by_case.items():
        if resolution in ("1 mm", "2 mm") and not name.endswith("grid") and "phantom" not in name:
            assert {"em-gmm", "deepsvg", "sklearn-gmm", "n4-atropos-mrf" if "bias" in name else "atropos-mrf"} \
                <= set(names), (resolution, name)
            assert ("deepg" in names) == (resolution == "1 mm" or name in run.DEEP_CONDITIONS)
            assert ({"n4-gmm", "n4-atropos-mrf"} <= set(names)) == ("bias" in name)
            # where a field is, Atropos + MRF runs at 1 mm only after N4 (it still runs without at 2 mm)
            assert ("atropos-mrf" in names) == (resolution == "2 mm" or "bias" not in name), (resolution, name)
    # our methods with the field always on beside the default, and another real image variant
    assert {"em-gmm-bias", "deepsvg-bias"} <= set(by_case[("2 mm", "clean")])
    assert any(name.endswith(run.SHIFTED_GRID) for _, name in by_case)
    # every job of the plan is a method the worker knows, and each runs once
    jobs = run.job_order(plan)
    assert len(jobs) == len(set(jobs)) == sum(len(names) for names in by_case.values())
