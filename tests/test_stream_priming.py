"""Start-up: a stream started ahead of its first use decodes one batch and waits for the trainer
to take it (then opens to `data.decode_tasks`), and a stage's streams are started in the order
this rank first samples their tasks, so the first steps' batches are first in the decode queue."""

from __future__ import annotations

import time
from types import SimpleNamespace

import task_plugins  # noqa: F401
from gppf.api.registry import build_task
from gppf.config.job import StreamConfig
from gppf.data.stream import TaskStream
from gppf.engine.hooks import StageHook
from tests.tasks_for_tests import task_entries


def _until(condition, timeout: float = 60.0) -> None:
    t0 = time.time()
    while not condition():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def test_a_started_stream_decodes_one_batch_until_the_trainer_takes_one(demo_root, ray_session):
    task = build_task("cls", task_entries(demo_root)["cls_folder"])
    task.check_data()
    stream = TaskStream(task, 0, 0, 1, StreamConfig(min_rows_per_pass=32, chunk_rows=16, decode_tasks=3))
    batches, sent = stream._batches, []

    def counted(*args):  # the batches the producer has handed to decode tasks
        for b in batches(*args):
            sent.append(b[1])
            yield b

    stream._batches = counted
    try:
        stream.start()
        _until(lambda: stream._queue.qsize() >= 1)  # the primed batch is decoded
        time.sleep(0.5)  # the producer thread would have sent the next batches by now
        assert sent == [1] and stream._queue.qsize() == 1
        stream.next()  # the trainer takes it: the stream opens to decode_tasks at once
        _until(lambda: len(sent) >= 1 + 3)
    finally:
        stream.close()


def test_streams_start_in_the_order_of_their_first_use():
    sequence = [2, 2, 0, 2, 0, 1]  # this rank's tasks at steps 0, 1, 2, ...
    plan = SimpleNamespace(weights=[[1.0, 1.0, 1.0, 0.0]], index_at=lambda step: 0)
    t = SimpleNamespace(step=0, stage_index=0, plan=plan, task_at=lambda s: sequence[s % len(sequence)])
    assert StageHook.first_use(t) == [2, 0, 1]  # task 3 has no weight in the stage
    t.step = 3  # a resumed run: from its own step on
    assert StageHook.first_use(t) == [2, 0, 1]
    t.task_at = lambda s: 1  # a task never met within the horizon still starts, last
    assert StageHook.first_use(t, horizon=10) == [1, 0, 2]
