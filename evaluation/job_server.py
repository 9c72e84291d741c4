"""Start each evaluation job in a fresh process without paying for its imports every time.

A server imports one method family's libraries (torch, ANTs, scikit-learn, SimpleITK: what
``methods.SPECS[name].modules`` lists, the engine excepted) and then forks one child per job,
which runs :func:`evaluation.worker.main`. Each job is still a process of its own, with only the
libraries a fresh interpreter for that method would have: one server per library set, because
scikit-learn's GMM ran about 20 % slower in a process that had torch and ANTs loaded too. Before
this, importing afresh cost each job about 3 s, 6.6 of the 57 job-minutes of ``make evaluate``.

The engine (DeepGMMSegmentLib) is imported by each job, so a job runs the tree as it is when it
starts, as the report's engine revisions assume.

POSIX only (``os.fork``, ``select`` on pipes), as the evaluation's peers are (ANTsPy has no
Windows build).

Protocol, one JSON line each way: ``{"argv": [...], "log": path}`` in; ``{"pid": N}`` once the
child runs, then ``{"exit": code}`` when it ends.

    python -m evaluation.job_server torch,sklearn.mixture    # normally started by JobServers
"""

from __future__ import annotations

import importlib
import json
import os
import select
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NOT_PRELOADED = ("DeepGMMSegmentLib",)  # imported per job: the tree as it is when the job starts


def serve(modules: list[str]) -> int:
    """Import ``modules``, then fork a worker per job line on stdin until stdin closes."""
    sys.path.insert(0, str(REPO_ROOT))
    for module in modules:
        importlib.import_module(module)
    importlib.import_module("evaluation.worker")
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_child(job["argv"], job["log"])  # never returns
        _send({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _send({"exit": os.waitstatus_to_exitcode(status)})
    return 0


def _run_child(argv: list[str], log_path: str) -> None:
    """The forked job: its output (C libraries' too) goes to ``log_path``, never to the server's pipe."""
    code = 1
    try:
        with open(log_path, "w") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        from evaluation import worker
        code = worker.main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001 - a job's failure is reported through its exit code and log
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no cleanup of the server's state in the child


def _send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class JobTimeout(Exception):
    pass


class ServerLost(Exception):
    pass


class JobServers:
    """One server per library set, started on first use; ``run`` returns a job's exit code."""

    def __init__(self):
        self._servers: dict[tuple, subprocess.Popen] = {}
        self._pending: dict[int, bytes] = {}  # bytes a server sent past the last full line

    def run(self, modules: tuple, argv: list[str], log_path: Path, timeout: float) -> int:
        """The job's exit code; JobTimeout (the job killed) or ServerLost (a new server serves the next job)."""
        key = tuple(m for m in modules if m not in NOT_PRELOADED)
        server = self._server(key)
        try:
            server.stdin.write((json.dumps({"argv": argv, "log": str(log_path)}) + "\n").encode())
            server.stdin.flush()
            pid = self._receive(server, timeout)["pid"]
            try:
                return self._receive(server, timeout)["exit"]
            except JobTimeout:
                os.kill(pid, 9)
                self._receive(server, 60)
                raise
        except (ServerLost, BrokenPipeError) as lost:
            self._servers.pop(key, None)
            server.kill()
            server.wait()
            raise ServerLost(f"the job server for {','.join(key)} ended ({lost})") from lost

    def close(self) -> None:
        for server in self._servers.values():
            server.stdin.close()
            server.wait()
        self._servers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _server(self, modules: tuple) -> subprocess.Popen:
        if modules not in self._servers:
            self._servers[modules] = subprocess.Popen(
                [sys.executable, "-m", "evaluation.job_server", ",".join(modules)], cwd=REPO_ROOT,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return self._servers[modules]

    def _receive(self, server: subprocess.Popen, timeout: float) -> dict:
        """The server's next message; raw reads, so that a line already read is never waited for."""
        fd = server.stdout.fileno()
        buffer = self._pending.pop(fd, b"")
        while b"\n" not in buffer:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                self._pending[fd] = buffer
                raise JobTimeout(f"no answer within {timeout:.0f} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise ServerLost(f"exit code {server.wait()}")
            buffer += chunk
        line, _, rest = buffer.partition(b"\n")
        self._pending[fd] = rest
        return json.loads(line)


if __name__ == "__main__":
    sys.exit(serve([m for m in sys.argv[1].split(",") if m]))
