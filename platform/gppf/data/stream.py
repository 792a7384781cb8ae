"""Per-worker, per-task Ray Data streams that never make one worker wait for another.

Ray Train's `get_dataset_shard` uses `streaming_split`, which pre-assigns blocks to ranks and has
a per-epoch barrier: with ranks consuming tasks at independent random rates it deadlocks within
about 60 steps (DESIGN.md). Instead each worker builds its own Ray Data pipeline over its share of
each task's units:

    pass p of task t on rank r = concat over epochs e in p of permute(units, seed, t, e)[r::world]
                                 -> task.source.read -> map_batches(task.preprocess) -> batches

with per-sample augmentation seeded per epoch (a pass repeats a small dataset for several epochs,
and each repeat is augmented anew),

so there is no shared coordinator, a worker that stops pulling a task only stops its own
pipeline (Ray Data backpressure), the number of steps is unbounded (passes roll over), and the
share follows the world size. The position (pass, batches taken) is the whole stream state.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from gppf.api.task import Task
from gppf.config.job import StreamConfig
from gppf.data.subsets import train_source
from gppf.io.batches import Collate


def task_key(name: str) -> int:
    return zlib.crc32(name.encode())


def _preprocess(batch: dict[str, np.ndarray], task: Task, train: bool, seed: int) -> dict[str, np.ndarray]:
    return task.preprocess(batch, train=train, seed=seed)


def configure_data_context(cfg: StreamConfig) -> None:
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = cfg.preserve_order
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Every chunk of every stream, and every evaluation, is one Ray Data execution; its INFO lines
    # ("Dataset ... execution finished in 0.07 seconds") would bury the trainer's progress lines.
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def build_dataset(task: Task, read, units: list[Any], train: bool, seed: int, cfg: StreamConfig):
    ds = read(units)
    return ds.map_batches(
        _preprocess,
        fn_kwargs={"task": task, "train": train, "seed": seed},
        batch_format="numpy",
        batch_size=max(1, task.cfg.batch_size),
        num_cpus=cfg.cpus_per_task,
    )


class TaskStream:
    """Unbounded batches of one task for one worker. `next()` returns (batch, seconds waited).

    A daemon thread pulls from Ray Data and keeps up to `prefetch_batches` ready in a queue. (Ray
    Data's own `prefetch_batches` spins a core while the consumer is busy with other tasks, which on
    a small machine halves training speed; a blocking queue costs nothing while it waits.)
    """

    def __init__(self, task: Task, seed: int, rank: int, world: int, cfg: StreamConfig | None = None):
        self.task = task
        self.seed = seed
        self.rank = rank
        self.world = world
        self.cfg = cfg or StreamConfig()
        src = train_source(task)  # label_fraction subset + extra train roots (pseudo-labels)
        if not src.units:
            raise ValueError(f"task {task.name!r}: the train split has no data")
        self.units = src.units
        self.read = src.read
        self.rows_per_unit = src.rows_per_unit
        self.unit_rows = src.unit_rows
        self.pass_idx = 0
        self.taken = 0  # batches the trainer has taken from the current pass
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    # -- the plan of a pass: a pure function of (seed, task, pass, rank, world) --------------
    def _share(self, epoch: int) -> list[Any]:
        rng = np.random.default_rng([self.seed, task_key(self.task.name), epoch])
        order = rng.permutation(len(self.units))
        mine = order[self.rank :: self.world]
        if len(mine) == 0:  # fewer units than workers (a few Parquet files): wrap around
            mine = order[[self.rank % len(order)]]
        return [self.units[i] for i in mine]

    def epochs_per_pass(self) -> int:
        rows = max(1, len(self._share(0)) * self.rows_per_unit)
        return max(1, math.ceil(self.cfg.min_rows_per_pass / rows))

    def pass_seed(self, pass_idx: int) -> int:
        rng = np.random.default_rng([self.seed, task_key(self.task.name), pass_idx, self.rank])
        return int(rng.integers(2**31))

    def epoch_seed(self, epoch: int) -> int:
        """The `seed` that `preprocess` derives per-sample augmentation from, for one epoch."""
        rng = np.random.default_rng([self.seed, task_key(self.task.name), 1, epoch, self.rank])
        return int(rng.integers(2**31))

    # -- producer thread ---------------------------------------------------------------------
    def _produce(self, pass_idx: int, skip: int, q: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        seen = 0

        def materialize(pass_idx: int, seed: int, chunk: list[Any]):
            return build_dataset(self.task, self.read, chunk, True, seed, self.cfg).materialize()

        # Chunks of a pass are materialised one ahead of the one being consumed: Ray Data's
        # executor then only runs while there is decoding to do. (A long-lived streaming
        # execution whose consumer is busy elsewhere keeps its scheduling thread spinning.)
        pool = ThreadPoolExecutor(1, thread_name_prefix=f"gppf-chunk-{self.task.name}")
        try:
            plan = self._chunks(pass_idx)
            # A resumed stream starts at the chunk that holds its next batch: the whole chunks
            # before it are skipped by counting their rows, not by decoding them.
            first, seen = self._resume_chunk(plan, skip)
            if first == len(plan):  # the pass was used up exactly: start the next one
                pass_idx, skip, seen, first, plan = pass_idx + 1, 0, 0, 0, self._chunks(pass_idx + 1)
            ahead = pool.submit(materialize, *plan[first])
            while not stop.is_set():
                for i in range(first, len(plan)):
                    current = ahead.result()
                    if i + 1 < len(plan):
                        ahead = pool.submit(materialize, *plan[i + 1])
                    else:  # the next pass's first chunk
                        plan_next = self._chunks(pass_idx + 1)
                        ahead = pool.submit(materialize, *plan_next[0])
                    # Shuffle rows inside the chunk too: Parquet units are whole files, whose rows
                    # may be stored sorted by class.
                    for batch in current.iter_torch_batches(
                        batch_size=self.task.cfg.batch_size,
                        drop_last=True,
                        prefetch_batches=0,
                        local_shuffle_buffer_size=self.cfg.chunk_rows,
                        local_shuffle_seed=self.pass_seed(pass_idx) + i,
                        collate_fn=Collate(),
                    ):
                        seen += 1
                        if seen > skip and not put((batch, pass_idx, seen)):
                            return
                if seen == 0:
                    raise RuntimeError(
                        f"task {self.task.name!r}: rank {self.rank}'s share of a pass yields no full batch "
                        f"of {self.task.cfg.batch_size} (each chunk, at most data.chunk_rows rows of one "
                        f"epoch, or each file is batched on its own); lower "
                        f"tasks.{self.task.name}.batch_size or add data"
                    )
                pass_idx, skip, seen, first, plan = pass_idx + 1, 0, 0, 0, plan_next
        except BaseException as e:  # hand it to the trainer, which raises it with the task's name
            put(e)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # let a running materialize finish

    def _rows(self, units: list[Any]) -> int | None:
        """Rows `read` yields for these units; None when a unit's count is unknown."""
        if self.unit_rows is None:
            return len(units) * self.rows_per_unit
        try:
            return sum(self.unit_rows(u) for u in units)
        except KeyError:
            return None

    def _resume_chunk(self, plan: list[tuple[int, int, list[Any]]], skip: int) -> tuple[int, int]:
        """(index of the chunk holding batch skip + 1 of the pass, batches in the chunks before it).
        Each chunk yields rows // batch_size batches (drop_last), whatever its local shuffle."""
        seen = 0
        for i, (_, _, units) in enumerate(plan):
            rows = self._rows(units)
            if rows is None:  # unknown: decode from here on
                return i, seen
            if seen + rows // self.task.cfg.batch_size > skip:
                return i, seen
            seen += rows // self.task.cfg.batch_size
        return len(plan), seen

    def _chunks(self, pass_idx: int) -> list[tuple[int, int, list[Any]]]:
        """A pass as (pass, augmentation seed, units) chunks of ~chunk_rows rows (whole batches).

        Chunks do not straddle epochs, so each carries its epoch's seed: an image appears once per
        epoch, and its repeats in later epochs of the pass get new augmentations. Only a share
        smaller than one batch (a tiny dataset on many workers) is chunked across epochs, with a
        seed per chunk: no batch could be formed otherwise. The pass starts with a small chunk of
        two batches: its first batch then waits for two batches to decode, not a whole chunk, and
        the next chunk decodes while those train."""
        bs = self.task.cfg.batch_size
        rows = math.ceil(max(self.cfg.chunk_rows, bs) / bs) * bs  # whole batches per chunk
        per = max(1, math.ceil(rows / self.rows_per_unit))
        first = min(per, max(1, math.ceil(2 * bs / self.rows_per_unit)))
        k = self.epochs_per_pass()
        epochs = range(pass_idx * k, (pass_idx + 1) * k)
        if len(self._share(0)) * self.rows_per_unit < bs:
            units = [u for e in epochs for u in self._share(e)]
            seed = self.epoch_seed(epochs[0])
            return [(pass_idx, seed + i, c) for i, c in enumerate(_slices(units, first, per))]
        out = []
        for j, epoch in enumerate(epochs):
            seed = self.epoch_seed(epoch)
            out += [(pass_idx, seed, c) for c in _slices(self._share(epoch), first if j == 0 else per, per)]
        return out

    def start(self) -> None:
        """Start decoding now (idempotent): the first `next()` then finds batches ready."""
        if self._queue is None:
            self._start()

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=max(1, self.cfg.prefetch_batches))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce,
            args=(self.pass_idx, self.taken, self._queue, self._stop),
            name=f"gppf-stream-{self.task.name}",
            daemon=True,
        )
        self._thread.start()

    def next(self) -> tuple[dict[str, torch.Tensor], float]:
        t0 = time.perf_counter()
        if self._queue is None:
            self._start()
        while True:
            try:
                item = self._queue.get(timeout=self.cfg.stall_warning_s)
                break
            except queue.Empty:
                print(
                    f"[gppf] rank {self.rank} has waited {time.perf_counter() - t0:.0f}s for a batch of task "
                    f"{self.task.name!r}: are Ray CPUs left for decoding? (scaling.cpus_per_worker "
                    f"reserves CPUs for the trainers; data.cpus_per_task is what each decode task needs)",
                    file=sys.__stdout__,
                    flush=True,
                )
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self.pass_idx, self.taken = item
        return batch, time.perf_counter() - t0

    def close(self, timeout: float = 60.0) -> None:
        """Stop the producer and wait for it: no Ray call of this stream is in flight afterwards
        (one still running when Ray shuts down can take the whole process with it)."""
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:  # unblock a producer waiting to put
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(0.1)
                if timeout <= 0:
                    break
                timeout -= 0.1
        self._queue = None
        self._stop = None
        self._thread = None

    def state(self) -> dict[str, int]:
        return {"pass_idx": self.pass_idx, "taken": self.taken}

    def load_state(self, state: dict[str, int]) -> None:
        self.close()
        self.pass_idx = int(state["pass_idx"])
        self.taken = int(state["taken"])


def eval_batches(
    task: Task, rank: int, world: int, cfg: StreamConfig | None = None, max_batches: int = 0
) -> Iterator[dict]:
    """One pass over rank's share of the validation split (no shuffling, last batch kept).
    `max_batches` > 0 stops early by limiting the dataset, so no execution is left running."""
    cfg = cfg or StreamConfig()
    src = task.source("val")
    units = src.units[rank::world]
    if not units:
        return iter(())
    ds = build_dataset(task, src.read, units, False, 0, cfg)
    if max_batches:
        ds = ds.limit(max_batches * task.cfg.batch_size)
    return iter(
        ds.iter_torch_batches(
            batch_size=task.cfg.batch_size, drop_last=False, prefetch_batches=0, collate_fn=Collate()
        )
    )


def _slices(units: list[Any], first: int, per: int) -> list[list[Any]]:
    """`units` cut into a first slice of `first` units, then slices of `per`."""
    bounds = [0, *range(first, len(units), per), len(units)]
    return [units[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def items_dataset(items: list[Any], rows_per_block: int = 64):
    """`ray.data.from_items` with blocks of ~rows_per_block rows. The default splits a few hundred
    items into as many blocks, and a Ray task per tiny block costs more than decoding it."""
    import ray.data

    return ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / rows_per_block)))
