"""Fixtures for the ZeroMQ / WebSocket interop tests; the helpers are in interop_helpers.py.

Every process started here is stopped (SIGTERM, then SIGKILL after 3 s) or killed in
teardown, and every ZeroMQ socket is closed with LINGER 0. A failed test's report carries
each worker's log (stdout+stderr) and each publisher subprocess's output.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Optional

import pytest
import zmq

from interop_helpers import PublisherProcess, Worker


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Attaches every worker's log (and publisher subprocess output) to a failed report."""
    rep = yield
    if rep.failed:
        for worker in getattr(item, "_interop_workers", []):
            try:
                text = worker.log_tail(300)
            except (OSError, ValueError) as e:
                text = f"(could not read {worker.log_path}: {e})"
            rep.sections.append(
                (f"worker {worker.name} log (exit={worker.proc.poll()})", text or "(empty)")
            )
        for proc in getattr(item, "_interop_procs", []):
            rep.sections.append((f"process {proc.name} output", proc.output_text() or "(empty)"))
    return rep


@pytest.fixture
def start_worker(request: pytest.FixtureRequest, tmp_path: Path):
    """Factory: ``start_worker([publisher endpoints], *extra_flags)`` starts a worker binary
    (``WORKER_BIN``, default target/debug/worker) on ephemeral loopback ports and waits (at
    most 15 s) for its announce file. All workers are stopped in teardown."""
    workers: list[Worker] = []
    request.node._interop_workers = workers

    def start(publishers: Iterable[str], *extra: str, name: Optional[str] = None) -> Worker:
        worker_name = name or f"interop-{len(workers)}-{request.node.name}"[:60]
        worker_name = re.sub(r"[^A-Za-z0-9_.-]", "_", worker_name)
        worker = Worker(tmp_path, worker_name, publishers, extra)
        workers.append(worker)
        worker.wait_announced()
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture
def zctx():
    """A fresh libzmq context; every socket on it is closed with LINGER 0 in teardown."""
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def start_publisher_process(request: pytest.FixtureRequest):
    """Factory for ``pushfleet_publisher.py`` subprocesses; all are killed in teardown."""
    procs: list[PublisherProcess] = []
    request.node._interop_procs = procs

    def start(*args: str, name: Optional[str] = None) -> PublisherProcess:
        p = PublisherProcess(name or f"pub{len(procs)}", list(args))
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()
