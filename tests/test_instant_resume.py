"""Instant resume: a stream resumed at batch k of a long pass skips the whole chunks before batch
k + 1 by counting their rows, decodes only the chunk that holds it (and the one after, ahead),
and yields exactly the batch an uninterrupted stream yields there."""

from __future__ import annotations

import time

import pytest
import torch

import task_plugins  # noqa: F401
from gppf.api.registry import build_task
from gppf.config.job import StreamConfig
from gppf.data.stream import TaskStream, configure_data_context
from tests.tasks_for_tests import task_entries

CHUNK = 32  # rows per chunk: 4 batches of 8


def _stream(demo_root, name: str, taken: int, count: list[int] | None, exact_rows: bool = True) -> TaskStream:
    task = build_task(name, task_entries(demo_root)[name])
    task.check_data()  # fills num_classes in
    # A long pass: the 48-image split repeated for 2048 rows (256 batches of 8).
    cfg = StreamConfig(min_rows_per_pass=2048, chunk_rows=CHUNK, prefetch_batches=1)
    configure_data_context(cfg)  # as the trainer does: deterministic order (and quiet)
    stream = TaskStream(task, seed=3, rank=0, world=1, cfg=cfg)
    read = stream.read

    def counting_read(units):
        if count is not None:
            count.append(stream._rows(units))
        return read(units)

    stream.read = counting_read
    if not exact_rows:  # the units' row counts unknown: decode up to the position, as before
        stream.unit_rows = lambda unit: (_ for _ in ()).throw(KeyError(unit))
    stream.load_state({"pass_idx": 0, "taken": taken})
    return stream


# Image items, and Parquet files (of 12 rows here: each chunk reads a few of them).
# (Ray Data reads Parquet slowly here: one position for it.)
@pytest.mark.parametrize("name, positions", [("cls_folder", (6, 48)), ("cls_parquet", (4,))])
def test_resume_decodes_the_same_few_chunks_wherever_it_resumes(demo_root, ray_session, name, positions):
    decoded, seconds = {}, {}
    for taken in positions:
        count: list[int] = []
        stream = _stream(demo_root, name, taken, count)
        t0 = time.perf_counter()
        batch, _ = stream.next()
        seconds[taken] = time.perf_counter() - t0
        decoded[taken] = sum(count)
        assert stream.state() == {"pass_idx": 0, "taken": taken + 1}
        stream.close()
        # The same batch as a stream that decodes its way there.
        slow = _stream(demo_root, name, taken, None, exact_rows=False)
        reference, _ = slow.next()
        slow.close()
        assert reference.keys() == batch.keys()
        for k in batch:
            assert torch.equal(reference[k], batch[k]), k
    # The chunk holding batch k + 1 and the chunk after it, never the chunks before.
    chunk = max(stream._rows(units) for _, _, units in stream._chunks(0))
    assert all(rows <= 2 * chunk for rows in decoded.values()), (decoded, chunk)
    print(name, "seconds to the first batch after resuming at batch k:", seconds)


def test_a_pass_used_up_exactly_resumes_at_the_next_pass(demo_root, ray_session):
    probe = _stream(demo_root, "cls_folder", 0, None)
    batches = sum(probe._rows(units) // 8 for _, _, units in probe._chunks(0))
    stream = _stream(demo_root, "cls_folder", batches, [])  # the pass's last batch was taken
    stream.next()
    assert stream.state() == {"pass_idx": 1, "taken": 1}
    stream.close()
