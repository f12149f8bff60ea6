"""Running many independent jobs (train_tiny's (router, seed) runs): which are done and which to
resume, then in this process or on a pool of spawned worker processes, with progress lines or
bars and an honest ETA.

    done, start = plan_jobs(jobs, paths, expected, resume, ckpt_keys)
    with Progress(labels, remaining, steps) as show:
        results = run_jobs(fn, [args_1, args_2, ...], workers, report=show)
    closure_sha256(root, "train_tiny.py")  # the hash of the files a job's result depends on

fn(*args, report=f) runs one job and calls f(message) as it goes; a message is a dict with
`job` (the job's label), `step` and `info` (text to show). Nothing here knows what a job is.
"""
from __future__ import annotations

import ast
import hashlib
import multiprocessing as mp
import os
import platform
import queue
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from lab.files import clock, load_checkpoint, read_json


def import_closure(root, entry):
    """The project files that running `entry` (a .py file, relative to the project root `root`)
    executes: it, and every module it imports that is a file under root, at any depth, with
    the __init__.py of their packages. Derived from the source (ast), so a file a module starts
    to import joins without a hand-kept list; an import inside a function or an `if` counts too
    (it may run). -> sorted relative paths ("ecmoe.py", "lab/compare.py", "moe/grouped.py", ...)."""
    root = Path(root)

    def files_of(module):               # "lab.compare" -> its file and its packages' __init__.py
        parts = module.split(".")
        found = [f"{'/'.join(parts[:i])}/__init__.py" for i in range(1, len(parts))]
        found += [f"{'/'.join(parts)}.py", f"{'/'.join(parts)}/__init__.py"]
        return [f for f in found if (root / f).is_file()]

    todo, seen = [entry], set()
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        package = rel.rsplit("/", 1)[0].replace("/", ".") if "/" in rel else ""
        for node in ast.walk(ast.parse((root / rel).read_text(encoding="utf-8"), rel)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:                          # from . import x, from ..y import z
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([p for p in up if p] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" if base else a.name for a in node.names]
            else:
                continue
            todo += [f for n in names if n for f in files_of(n)]
    return sorted(seen)


def closure_sha256(root, entry):
    """sha256 over the files of import_closure(root, entry): each one's path, length and bytes,
    in path order."""
    h = hashlib.sha256()
    for rel in import_closure(root, entry):
        data = (Path(root) / rel).read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def plan_jobs(jobs, paths, expected, resume, ckpt_keys=("step", "config")):
    """Jobs that leave a checkpoint while they run and a result JSON when they finish, both with
    the "config" they were made with. paths(job) -> (checkpoint, result JSON).

    -> (results of the finished jobs, {job: step to start from} for the others). With resume a
    finished job's JSON is reused and a checkpoint resumed from its "step"; without, both files
    are deleted. ValueError naming the file if one is unreadable or was made with another config
    than `expected` (the keys that differ)."""
    done, start = [], {}
    for job in jobs:
        ckpt, result = paths(job)
        if not resume:
            for p in (ckpt, result):
                p.unlink(missing_ok=True)
        if not (resume and (result.exists() or ckpt.exists())):
            start[job] = 0
            continue
        path = result if result.exists() else ckpt
        prev = read_json(path, "run file", ("config",)) if path == result else \
            load_checkpoint(path, ckpt_keys)
        diff = [k for k in sorted(expected.keys() | prev["config"].keys())
                if prev["config"].get(k) != expected.get(k)]
        if diff:
            raise ValueError(f"{path} was made with different {diff}; use another --out or drop "
                             "--resume")
        if path == result:
            done.append(prev)
        else:
            start[job] = prev["step"]
    return done, start


def run_jobs(fn, jobs, workers=1, report=print):
    """[fn(*args, report=...) for args in jobs], results in the order of `jobs`.

    workers > 1: a pool of that many spawned processes (spawn: no fork of a torch-initialised
    parent); each job's arguments are pickled to its worker, and the messages fn reports come
    back through a queue to `report`, called in this process only."""
    if workers == 1 or len(jobs) <= 1:
        return [fn(*args, report=report) for args in jobs]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        messages = manager.Queue()                  # a proxy: it can travel as an argument
        futures = [pool.submit(fn, *args, report=messages.put) for args in jobs]
        while not all(f.done() for f in futures) or not messages.empty():
            try:
                report(messages.get(timeout=0.2))
            except queue.Empty:
                pass
        return [f.result() for f in futures]


class Progress:
    """Progress of jobs of `steps` steps each: rich live bars on a terminal, plain log lines
    (run i of N, elapsed, ETA) otherwise.

    labels: every job of the invocation, in order (for "run i of N"); remaining: {label: steps
    this process will train}, for the jobs it runs (a job resumed at step s has steps - s left).
    The ETA counts only the steps trained in this process, never those restored from a
    checkpoint: elapsed / steps trained here * steps still to train."""
    def __init__(self, labels, remaining, steps):
        self.live = sys.stdout.isatty()
        self.steps, self.t0 = steps, time.time()
        self.index = {j: i + 1 for i, j in enumerate(labels)}
        self.total = len(labels)
        self.start = {j: steps - n for j, n in remaining.items()}   # first step trained here
        self.todo_steps = sum(remaining.values())
        self.done = {}                            # job -> steps trained here so far
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn)
            self.bars = Progress(TextColumn("{task.description:>16}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[info]}"))
            self.tasks = {j: self.bars.add_task(j.strip(), total=steps, completed=self.start[j],
                                                info="") for j in remaining}

    def __enter__(self):
        if self.live:
            self.bars.start()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.bars.stop()

    def eta(self, elapsed):
        done = sum(self.done.values())
        return elapsed / max(done, 1) * max(self.todo_steps - done, 0)

    def __call__(self, msg):
        job = msg["job"]
        self.done[job] = msg["step"] - self.start.get(job, 0)
        elapsed = time.time() - self.t0
        eta = clock(self.eta(elapsed))
        if self.live:
            self.bars.update(self.tasks[job], completed=msg["step"],
                             info=f"{msg['info']}  ETA {eta}")
        else:
            print(f"[run {self.index[job]:>2}/{self.total} {job}] step {msg['step']:>5}/"
                  f"{self.steps} {msg['info']}  elapsed {clock(elapsed)} ETA {eta}", flush=True)


def cpu_model():
    """The CPU model ("model name" of /proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def hardware(device, workers, threads):
    """-> dict: platform, processor, cores, device (GPU name), workers x threads, summary."""
    hw = dict(platform=platform.platform(), processor=cpu_model(), cpu_count=os.cpu_count(),
              device=device, workers=workers, threads_per_worker=threads)
    if device == "cuda":
        import torch
        hw["gpu"] = torch.cuda.get_device_name(0)
    hw["summary"] = (hw.get("gpu") or f"{hw['processor']}, {hw['cpu_count']} CPU cores") + \
        f", {workers} worker(s) x {threads} thread(s)"
    return hw
