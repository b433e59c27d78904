"""Executors: run one task function over many tasks, here, on all local cores, or on a Ray cluster.

Tasks and results are small JSON-able dicts (the data itself stays in the work folder), so the three
give identical outputs. Results come back in any order; the driver sorts them by name.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable, Iterator

from ..errors import UserError
from .report import progress


class SerialExecutor:
    """In this process, one task after another (debugging, tests, small inputs)."""

    def map(self, fn: Callable[[dict], dict], tasks: list[dict], desc: str = "") -> Iterator[dict]:
        yield from progress(map(fn, tasks), len(tasks), desc)


class ProcessExecutor:
    """A pool of worker processes on this machine; no Ray needed."""

    def __init__(self, workers: int):
        self.workers = workers

    def map(self, fn: Callable[[dict], dict], tasks: list[dict], desc: str = "") -> Iterator[dict]:
        if len(tasks) <= 1 or self.workers <= 1:
            yield from SerialExecutor().map(fn, tasks, desc)
            return
        # spawn, not fork: the parent may hold threads (torch, Ray) that a forked child would inherit
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(self.workers, len(tasks))) as pool:
            yield from progress(pool.imap_unordered(fn, tasks), len(tasks), desc)


class _RayTask:
    """A picklable row -> row wrapper for Ray Data's `map`."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, row: dict) -> dict:
        return {"result": json.dumps(self.fn(json.loads(row["task"])))}


class RayExecutor:
    """Ray Data: each task is one row, mapped by a Ray task with one CPU.

    Joins the cluster at `address` (or starts a local Ray when none is running). Workers read and write
    the work folder directly, so on a multi-node cluster it must be on a shared file system.
    """

    def __init__(self, address: str | None = None, num_cpus: int = 0):
        import ray

        if not ray.is_initialized():
            ray.init(address=address, num_cpus=num_cpus or None, include_dashboard=False,
                     log_to_driver=False, ignore_reinit_error=True)
        ray.data.DataContext.get_current().enable_progress_bars = False

    def map(self, fn: Callable[[dict], dict], tasks: list[dict], desc: str = "") -> Iterator[dict]:
        import ray

        if not tasks:
            return
        ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
        rows = ds.map(_RayTask(fn), num_cpus=1).iter_rows()
        yield from progress((json.loads(r["result"]) for r in rows), len(tasks), desc)


def make_executor(kind: str, workers: int = 0, address: str | None = None):
    if kind == "serial":
        return SerialExecutor()
    if kind == "processes":
        return ProcessExecutor(workers or multiprocessing.cpu_count())
    if kind == "ray":
        return RayExecutor(address, workers)
    raise UserError(f"unknown executor {kind!r}")
