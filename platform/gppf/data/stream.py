"""Per-worker, per-task streams that never make one worker wait for another.

Ray Train's `get_dataset_shard` uses `streaming_split`, which pre-assigns blocks to ranks and has
a per-epoch barrier: with ranks consuming tasks at independent random rates it deadlocks within
about 60 steps (DESIGN.md). Instead each worker streams its own share of each task's units:

    pass p of task t on rank r = concat over epochs e in p of permute(units, seed, t, e)[r::world]
                                 -> chunks -> raw rows (DataSource.load, in the trainer's process)
                                 -> shuffled, cut into batches -> one Ray task per batch runs
                                    task.preprocess -> results in order

with per-sample augmentation seeded per epoch (a pass repeats a small dataset for several epochs,
and each repeat is augmented anew),

so there is no shared coordinator, a worker that stops pulling a task only stops its own stream
(a bounded queue), the number of steps is unbounded (passes roll over), and the share follows
the world size. The position (pass, batches taken) is the whole stream state.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import queue
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from gppf.api.task import DataSource, Task
from gppf.config.job import StreamConfig
from gppf.data.subsets import train_source
from gppf.io.batches import collate_numpy


def task_key(name: str) -> int:
    return zlib.crc32(name.encode())


def _decode(task: Task, rows: dict[str, np.ndarray], train: bool, seed: int) -> dict[str, np.ndarray]:
    return task.preprocess(rows, train=train, seed=seed)


_REMOTE_DECODE = None


def _remote_decode():
    """`_decode` as a Ray remote function (made once per process, on first use: importing this
    module must not need Ray to be running)."""
    global _REMOTE_DECODE
    if _REMOTE_DECODE is None:
        import ray

        _REMOTE_DECODE = ray.remote(_decode)
    return _REMOTE_DECODE


def _get(ref, stop: threading.Event) -> dict[str, np.ndarray] | None:
    """A decode task's result, or None once `stop` is set (checked twice a second: a stream being
    closed does not wait for a batch nobody will take)."""
    import ray

    while not stop.is_set():
        ready, _ = ray.wait([ref], timeout=0.5)
        if ready:
            return ray.get(ref)
    return None


def _cause(e: BaseException) -> BaseException:
    """The plugin's own exception out of a Ray task's error (BadSampleError naming the file)."""
    import ray.exceptions

    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, Exception):
        return e.cause
    return e


def _num_rows(rows: dict[str, np.ndarray]) -> int:
    return len(next(iter(rows.values()))) if rows else 0


def row_reader(
    src: DataSource, cfg: StreamConfig | None = None
) -> Callable[[list[Any]], dict[str, np.ndarray]]:
    """units -> their raw rows as numpy columns, read in this process: the source's `load`, the
    units themselves for `items_dataset` sources, else through its Ray Data reader."""
    return src.load or (item_rows if src.read is items_dataset else _rows_through(src.read, cfg))


def _rows_through(
    read: Callable[[list[Any]], Any], cfg: StreamConfig | None
) -> Callable[[list[Any]], dict[str, np.ndarray]]:
    """A source without `load`: its raw rows through its Ray Data reader (one execution per chunk,
    in order: Ray Data is set up by `configure_data_context` on first use, not imported before)."""

    def load(units: list[Any]) -> dict[str, np.ndarray]:
        configure_data_context(cfg or StreamConfig())
        batches = list(read(units).iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0))
        if not batches:
            return {}
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    return load


def configure_data_context(cfg: StreamConfig) -> None:
    """Ray Data in this process: rows in order (`data.preserve_order`), no progress bars, no
    per-execution INFO lines (for readers that go through Ray Data, and pseudo-labelling)."""
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = cfg.preserve_order
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Its INFO lines ("Dataset ... execution finished in 0.07 seconds"), one per execution, would
    # bury the trainer's progress lines.
    logging.getLogger("ray.data").setLevel(logging.WARNING)


class TaskStream:
    """Unbounded batches of one task for one worker. `next()` returns (batch, seconds waited).

    A daemon thread reads each chunk's raw rows in this process (`DataSource.load`: paths and
    labels, or a Parquet file's bytes), shuffles them, cuts them into batches and has each batch
    decoded by a Ray task (`task.preprocess`, `data.cpus_per_task` CPUs), keeping
    `data.decode_tasks` of them in flight and taking their results in order into a queue of
    `data.prefetch_batches`. That is a DataLoader's shape (workers, prefetch, in-order delivery)
    with Ray's scheduler as the worker pool: decode runs wherever the cluster has CPUs, every
    stream of every worker shares the same pool, and the object store holds at most
    decode_tasks + prefetch_batches batches per stream. (One Ray Data execution per chunk, as
    before, paid the executor's start and its block bookkeeping per chunk and decoded one chunk at
    a time: half a DataLoader's throughput on 2 CPUs, docs/benchmarks.md.) A blocking get costs
    nothing while the trainer is busy with other tasks.
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
        # units -> raw rows (numpy columns), in this process
        self.read = row_reader(src, self.cfg)
        self.rows_per_unit = src.rows_per_unit
        self.unit_rows = src.unit_rows
        self.pass_idx = 0
        self.taken = 0  # batches the trainer has taken from the current pass
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._opened = threading.Event()  # set once the trainer has taken a batch
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

    def _batches(self, pass_idx: int, skip: int) -> Iterator[tuple[int, int, int, dict[str, np.ndarray]]]:
        """(pass, batches of the pass so far, augmentation seed, raw rows) of every batch after
        batch `skip` of pass `pass_idx`, without end. Batch j of a pass is a pure function of the
        plan: chunk c's rows in the order of `default_rng(pass_seed + c)`, cut into whole batches
        (a chunk's last partial batch is dropped). Resuming reads only the chunk that holds the
        next batch (whole chunks before it are skipped by counting their rows) and decodes nothing
        it skips."""
        bs = self.task.cfg.batch_size
        plan = self._chunks(pass_idx)
        first, seen = self._resume_chunk(plan, skip)
        while True:
            for i in range(first, len(plan)):
                _, seed, units = plan[i]
                rows = self.read(units)
                n = _num_rows(rows)
                order = np.random.default_rng(self.pass_seed(pass_idx) + i).permutation(n)
                for b in range(n // bs):
                    seen += 1
                    if seen > skip:
                        idx = order[b * bs : (b + 1) * bs]
                        yield pass_idx, seen, seed, {k: v[idx] for k, v in rows.items()}
            if seen == 0 and skip == 0:
                raise RuntimeError(
                    f"task {self.task.name!r}: rank {self.rank}'s share of a pass yields no full batch "
                    f"of {self.task.cfg.batch_size} (each chunk, at most data.chunk_rows rows of one "
                    f"epoch, or each file is batched on its own); lower "
                    f"tasks.{self.task.name}.batch_size or add data"
                )
            pass_idx, skip, seen, first, plan = pass_idx + 1, 0, 0, 0, self._chunks(pass_idx + 1)

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

        opened = self._opened
        width = lambda: self.cfg.decode_tasks if opened.is_set() else 1  # noqa: E731
        try:
            raw = ((rows, seed, (p, seen)) for p, seen, seed, rows in self._batches(pass_idx, skip))
            for batch, (p, seen) in decoded(self.task, raw, True, self.cfg, stop, width):
                if not put((batch, p, seen)):
                    return
                while not opened.wait(0.5):  # primed: one batch ready until the trainer takes one
                    if stop.is_set():
                        return
        except BaseException as e:  # hand it to the trainer, which raises it with the task's name
            put(_cause(e))

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
        """Prime the stream (idempotent): decode its first batch now, and no more until the
        trainer takes one (then `data.decode_tasks` at once): a job's many streams, started
        together, do not queue their whole prefetch ahead of the batches the first steps need."""
        if self._queue is None:
            self._start()

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=max(1, self.cfg.prefetch_batches))
        self._stop = threading.Event()
        self._opened = threading.Event()
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
        self._opened.set()
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
    task: Task,
    rank: int,
    world: int,
    cfg: StreamConfig | None = None,
    max_batches: int = 0,
    local: bool = False,
) -> Iterator[dict]:
    """One pass over rank's share of the validation split, in order (no shuffling, last batch
    kept), each batch decoded by a Ray task as in training (`decoded`), or with `local` in this
    process (one batch ahead, in a thread). `max_batches` > 0 stops after that many."""
    cfg = cfg or StreamConfig()
    src = task.source("val")
    units = src.units[rank::world]
    load = row_reader(src, cfg)
    per_read = max(1, cfg.chunk_rows // max(1, src.rows_per_unit))
    raw = ((rows, 0, None) for rows in _in_batches(load, units, task.cfg.batch_size, per_read))
    if max_batches:
        raw = itertools.islice(raw, max_batches)
    if local:
        return _ahead(collate_numpy(task.preprocess(rows, train=False, seed=seed)) for rows, seed, _ in raw)
    return (batch for batch, _ in decoded(task, raw, False, cfg))


def _ahead(items: Iterator[Any]) -> Iterator[Any]:
    """`items`, with the next one computed in a thread while the consumer works on this one."""
    with ThreadPoolExecutor(1, thread_name_prefix="gppf-eval-decode") as pool:
        nxt = pool.submit(next, items, None)
        while (item := nxt.result()) is not None:
            nxt = pool.submit(next, items, None)
            yield item


def _in_batches(
    load: Callable[[list[Any]], dict[str, np.ndarray]], units: list[Any], bs: int, chunk_units: int
) -> Iterator[dict[str, np.ndarray]]:
    """The rows of `units` in order, read `chunk_units` units at a time, as batches of `bs` rows
    (the last one shorter)."""
    held: dict[str, np.ndarray] = {}
    for a in range(0, len(units), chunk_units):
        rows = load(units[a : a + chunk_units])
        held = {k: np.concatenate([held[k], v]) for k, v in rows.items()} if held else rows
        while _num_rows(held) >= bs:
            yield {k: v[:bs] for k, v in held.items()}
            held = {k: v[bs:] for k, v in held.items()}
    if held and _num_rows(held):
        yield held


def decoded(
    task: Task,
    raw: Iterator[tuple[dict[str, np.ndarray], int, Any]],
    train: bool,
    cfg: StreamConfig,
    stop: threading.Event | None = None,
    width: Callable[[], int] | None = None,
) -> Iterator[tuple[dict[str, Any], Any]]:
    """(batch, tag) for each (raw rows, seed, tag) of `raw`, in order: each batch is
    `task.preprocess`ed by a Ray task reserving `cfg.cpus_per_task` CPUs, `cfg.decode_tasks` of
    them in flight (a DataLoader's workers and prefetch, with the cluster as the worker pool;
    `width()` instead, when given), and collated here (gppf.io.batches). Ends early, cancelling
    what is in flight, once `stop` is set or when the consumer closes the generator."""
    import ray

    task_ref = ray.put(task)  # shipped once, not with every batch
    # "DEFAULT": wherever the cluster has CPUs, also from a Tune trial, whose placement group would
    # otherwise capture the task (and hold no bundle for it)
    decode = _remote_decode().options(
        num_cpus=cfg.cpus_per_task, name=f"decode {task.name}", scheduling_strategy="DEFAULT"
    )
    inflight: collections.deque = collections.deque()
    stop = stop or threading.Event()
    try:
        for rows, seed, tag in raw:
            inflight.append((decode.remote(task_ref, rows, train, seed), tag))
            while len(inflight) >= max(1, width() if width else cfg.decode_tasks):
                ref, tag = inflight.popleft()
                out = _get(ref, stop)
                if out is None:
                    return
                yield collate_numpy(out), tag
        while inflight:
            ref, tag = inflight.popleft()
            out = _get(ref, stop)
            if out is None:
                return
            yield collate_numpy(out), tag
    finally:
        for ref, _ in inflight:  # decoding nobody will take: free its CPUs
            with contextlib.suppress(Exception):
                ray.cancel(ref)


def _slices(units: list[Any], first: int, per: int) -> list[list[Any]]:
    """`units` cut into a first slice of `first` units, then slices of `per`."""
    bounds = [0, *range(first, len(units), per), len(units)]
    return [units[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def items_dataset(items: list[Any], rows_per_block: int = 64):
    """`ray.data.from_items` with blocks of ~rows_per_block rows. The default splits a few hundred
    items into as many blocks, and a Ray task per tiny block costs more than decoding it."""
    import ray.data

    return ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / rows_per_block)))


def item_rows(items: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Item dicts as one batch of numpy columns, as `items_dataset` would give them: numbers as
    numeric arrays, anything else (paths, JSON strings, nested lists) as object arrays."""
    out: dict[str, np.ndarray] = {}
    for key in items[0] if items else ():
        values = [item[key] for item in items]
        if all(isinstance(v, (bool, int, float, np.number)) for v in values):
            out[key] = np.asarray(values)
        else:
            column = np.empty(len(values), dtype=object)
            for i, v in enumerate(values):  # element by element: a list stays one element
                column[i] = v
            out[key] = column
    return out
