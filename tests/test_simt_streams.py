"""The access pattern that deadlocks `get_dataset_shard` must run: each of 2 Ray Train workers
reads its own task with p = 0.9 for 300 steps, with an all_reduce every step."""

from __future__ import annotations

import pytest

from tests.tasks_for_tests import task_entries


@pytest.mark.timeout(420)
def test_uneven_per_worker_task_rates_do_not_deadlock(demo_root, ray_session):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    def loop(config):
        import tempfile
        from pathlib import Path

        import numpy as np
        import torch
        import torch.distributed as dist

        import task_plugins  # noqa: F401
        from gppf.api.registry import build_task
        from gppf.config.job import StreamConfig
        from gppf.data.stream import TaskStream, configure_data_context

        rank = ray.train.get_context().get_world_rank()
        scfg = StreamConfig(min_rows_per_pass=32, chunk_rows=32)
        configure_data_context(scfg)
        tasks = [build_task(n, e) for n, e in config["tasks"].items()]
        streams = [TaskStream(t, 0, rank, 2, scfg) for t in tasks]
        rng = np.random.default_rng(rank)
        counts = [0, 0]
        for _ in range(config["steps"]):
            t = rank if rng.random() < 0.9 else 1 - rank  # rank 0 mostly task 0, rank 1 mostly task 1
            batch, _ = streams[t].next()
            counts[t] += 1
            x = torch.tensor([float(batch["image"].shape[0])])
            dist.all_reduce(x)  # lockstep, as a training step is
        table = torch.zeros(2, 2)
        table[rank] = torch.tensor(counts, dtype=torch.float32)
        dist.all_reduce(table)
        # Result.metrics keeps only reports that carry a checkpoint: rank 0 attaches a tiny one.
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "done").write_text("ok")
            ckpt = ray.train.Checkpoint.from_directory(d) if rank == 0 else None
            ray.train.report({"counts": table.int().tolist()}, checkpoint=ckpt)

    entries = task_entries(demo_root)
    trainer = TorchTrainer(
        loop,
        train_loop_config={
            "tasks": {"a": {**entries["cls_folder"], "num_classes": 4}, "b": entries["seg"]},
            "steps": 300,
        },
        torch_config=TorchConfig(backend="gloo", timeout_s=60),  # a hang becomes an error
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(storage_path=str(demo_root.parent / "simt_runs"), name="deadlock"),
    )
    result = trainer.fit()
    counts = result.metrics["counts"]  # counts[rank][task]
    assert [sum(row) for row in counts] == [300, 300]
    assert counts[0][0] > 240 and counts[1][1] > 240  # each rank read its own task ~90% of the time
