"""encode.py's writer processes (`encode.num_writers`): `vector_rows` (pruned vectors -> JSON lines) for each batch in
worker processes while the model runs on, results in submission order."""
from __future__ import annotations

import collections
import json
import multiprocessing
import multiprocessing.connection
import os
import threading
from concurrent.futures import ProcessPoolExecutor

from lsr_core.sparse import vector_rows

_WORKER_ARGS: list = [0, None]  # in a VectorWriters process: [generation, (vocab, scale)], from its first batch


def _start_worker() -> None:
    """A VectorWriters process exits when its parent does, however the parent ends (SIGKILL included): the pool's
    own pipes stay open in every worker, so a worker would otherwise wait for jobs forever."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()


def _exit_with(sentinel) -> None:
    multiprocessing.connection.wait([sentinel])  # readable once the parent is gone
    os._exit(1)


def _worker_ready() -> None:
    """A no-op job: submitting one per process makes the pool start them all at once."""


def _worker_rows(generation: int, setup: bytes | None, pruned: list) -> tuple[int, list[tuple[str, int]]]:
    """(this process's id, `vector_rows` of the batch); `setup` (JSON [vocab, scale]) comes with the batches of a
    `generation` until every process has confirmed it."""
    if setup is not None and _WORKER_ARGS[0] != generation:
        _WORKER_ARGS[:] = [generation, json.loads(setup)]
    if _WORKER_ARGS[0] != generation:
        raise RuntimeError("a VectorWriters process got a batch before the vocabulary")
    return os.getpid(), vector_rows(pruned, *_WORKER_ARGS[1])


class VectorWriters:
    """`vector_rows` for each submitted batch, in `processes` worker processes while the caller goes on (encode.py:
    the model runs the next batches), or at submission in this process when `processes` is 0. Results come back in
    submission order, paired with the caller's key; at most 2 x `processes` batches wait, so memory stays flat. A
    worker's error is raised where its batch's result is taken. Use as a context manager; the processes also exit
    when this process dies.

    The processes start when the object is made; the vocabulary, which comes with the model, follows in `start()`
    (given at once with `vocab`). Starting a process takes seconds (it imports torch), which the caller spends
    loading its model. The vocabulary travels with the batches, until each process has returned one: nothing waits
    for a process to be ready to take it (a pipe holds ~64 KB, a vocabulary's JSON 0.3-2 MB)."""

    def __init__(self, processes: int = 0, vocab: list[str] | None = None, scale: float = 0.0):
        self.processes, self.limit = processes, 2 * processes
        self.vocab, self.scale = None, 0.0
        self.generation, self.setup, self.ready = 0, b"", set()  # ready: processes holding this generation's vocab
        self.pending = collections.deque()
        self.pool = None
        if processes:
            # spawn: forking a process that holds CUDA state or torch's threads is unsafe
            self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start_worker)
            for _ in range(processes):  # the pool starts a process per job it cannot hand to an idle one
                self.pool.submit(_worker_ready)
        if vocab is not None:
            self.start(vocab, scale)

    def start(self, vocab: list[str], scale: float = 0.0) -> None:
        """The vocabulary (token id -> string) and quantisation scale for every batch from now on."""
        if self.pending:
            raise RuntimeError("VectorWriters.start with batches in flight: drain() them first")
        self.vocab, self.scale = vocab, scale
        if self.pool:
            self.generation, self.ready = self.generation + 1, set()
            self.setup = json.dumps([vocab, scale]).encode("ascii")  # serialised once, not per batch

    def submit(self, key, pruned: list) -> list[tuple]:
        """Queue one batch; returns the (key, rows) pairs finished and no longer waiting, oldest first."""
        if self.vocab is None:
            raise RuntimeError("VectorWriters.submit before start(vocab)")
        if self.pool:
            setup = self.setup if len(self.ready) < self.processes else None
            job = self.pool.submit(_worker_rows, self.generation, setup, pruned)
        else:
            job = vector_rows(pruned, self.vocab, self.scale)
        self.pending.append((key, job))
        return [self._take() for _ in range(len(self.pending) - self.limit)]

    def drain(self) -> list[tuple]:
        """Every batch still waiting, as (key, rows), in submission order."""
        return [self._take() for _ in range(len(self.pending))]

    def _take(self) -> tuple:
        key, job = self.pending.popleft()
        if not self.pool:
            return key, job
        process, rows = job.result()
        self.ready.add(process)
        return key, rows

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool:
            self.pool.shutdown(cancel_futures=True)
