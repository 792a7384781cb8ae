"""Data roots and run_dir in object storage (gppf.io.storage): an S3 API served on 127.0.0.1 by moto.

The demo job reads its data from the bucket, writes its checkpoints and logs there, is killed
(SIGKILL, once its first checkpoint is registered) and resumes in place from the checkpoint stored there."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from moto.server import ThreadedMotoServer

from gppf.io import storage

JOB = Path(__file__).resolve().parents[1] / "jobs" / "gppf_r50.py"
STEPS = 4


@pytest.fixture(scope="module")
def s3():
    """key -> the URI of s3://gppf/<key> on a moto server; credentials and endpoint ride in the URI
    (pyarrow.fs.FileSystem.from_uri's options), so Ray workers need no environment."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    base = storage.path(
        f"s3://testing:secret@gppf?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    )
    pafs.S3FileSystem(
        access_key="testing",
        secret_key="secret",
        endpoint_override=f"{host}:{port}",
        scheme="http",
        allow_bucket_creation=True,
    ).create_dir("gppf")
    yield lambda key: base / key
    server.stop()


def test_uri_paths_list_read_and_copy(s3, tmp_path):
    root = s3("unit")
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.png").write_bytes(b"png")
    (tmp_path / "a" / "list.txt").write_text("x\n")
    storage.copy_tree(tmp_path / "a", root)
    assert storage.subdirs(root) == ["b"] and [p.name for p in root.glob("*.txt")] == ["list.txt"]
    assert (root / "b" / "x.png").read_bytes() == b"png" and (root / "b").is_dir()
    assert storage.missing([str(root / "b" / "x.png"), str(root / "b" / "y.png")]) == [
        str(root / "b" / "y.png")
    ]
    assert (root / "b" / "x.png").stem == "x" and (root / "b" / "x.png").parent == root / "b"
    assert "secret" not in storage.display(root) and "secret" in str(root)
    back = tmp_path / "back"
    storage.copy_tree(root, back, only=("b", "absent"))
    assert [p.name for p in back.iterdir()] == ["b"] and (back / "b" / "x.png").read_bytes() == b"png"


def _sets(steps: int) -> list[str]:
    sets = [
        f"train.steps={steps}",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.eval_max_batches=1",
        "train.eval_at_start=false",
        "data.chunk_rows=16",
        "data.min_rows_per_pass=16",
        "data.prefetch_batches=1",
        "run_name=s3run",
    ]
    return [a for s in sets for a in ("--set", s)]


def _registered_checkpoint(run) -> bool:
    """Ray Train has registered a checkpoint in storage (a checkpoint directory alone may still be
    uploading: a run killed then restarts from the previous one, here from scratch)."""
    snapshot = run / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and bool(json.loads(snapshot.read_text()).get("latest_checkpoint_result"))


def test_demo_job_on_s3_is_killed_and_resumes_from_the_stored_checkpoint(s3, ray_session, tmp_path):
    from gppf.launch.cli import main
    from tests.test_jobs import load_job

    data, runs = s3("demo"), s3("runs")
    run = runs / "s3run"
    argv = ["--demo-root", str(data), "--demo-images", "24", *_sets(STEPS), "--set", f"run_dir={runs}"]
    # The first attempt is its own driver process on the tests' Ray cluster, killed like a lost
    # head node's job would be.
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(JOB), *argv],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 300
        while not _registered_checkpoint(run):
            assert proc.poll() is None, (
                f"the job ended before its first checkpoint:\n{log.read_text()[-3000:]}"
            )
            assert time.time() < deadline, f"no checkpoint in S3 after 300 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert "secret" not in log.read_text()  # URIs are shown without their credentials
    config = json.loads((run / "config.json").read_text())
    assert all(t["data_root"].startswith("s3://") for t in config["tasks"].values())

    mod = load_job(JOB)
    metrics = main(mod.__doc__, mod.full_config, mod.demo_config, [*argv, "--resume", str(run)])
    assert 0 < metrics["start_step"] < STEPS and metrics["step"] == STEPS
    assert metrics["checkpoint"].startswith("s3://") and storage.path(metrics["checkpoint"]).is_dir()
    assert (run / "results.json").is_file() and any((run / "tensorboard").iterdir())
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Both attempts' lines: the first attempt's were uploaded with its checkpoint.
    assert logged[0] == 1 and logged[-1] == STEPS and metrics["start_step"] in logged


def test_every_bundled_plugin_checks_its_data_and_trains_a_batch_from_s3(s3, ray_session):
    """Each bundled task type (every entry point of this distribution) on a data root in the
    bucket: its data check, one batch from its stream, and one forward + backward of that batch."""
    from importlib import metadata

    import torch

    from gppf.api.registry import ENTRY_POINT_GROUP, build_task
    from gppf.config.job import BackboneConfig, JobConfig, StreamConfig
    from gppf.data.demo import generate
    from gppf.data.stream import TaskStream
    from gppf.engine.step import forward_parts, step_rng, weighted_losses
    from gppf.models.build import build_model
    from tests.tasks_for_tests import task_entries

    root = generate(str(s3("plugins")), n_train=8, n_val=4)
    entries = task_entries(root)
    points = metadata.entry_points(group=ENTRY_POINT_GROUP)
    bundled = {ep.name for ep in points if ep.value.startswith("task_plugins.")}
    assert {e["type"] for e in entries.values()} == bundled
    stream_cfg = StreamConfig(chunk_rows=8, min_rows_per_pass=8, prefetch_batches=1)
    cpu = torch.device("cpu")
    for name, entry in entries.items():
        task = build_task(name, entry)
        assert storage.is_uri(task.cfg.data_root), name
        task.check_data()  # on the driver: listings, headers, derived values (num_classes)
        stream = TaskStream(task, 0, 0, 1, stream_cfg)
        try:
            batch, _ = stream.next()
        finally:
            stream.close()
        torch.manual_seed(0)
        job = JobConfig(tasks={name: entry}, backbone=BackboneConfig(name="resnet10t"))
        model = build_model(job, [task]).train()
        batch = task.train_batch(task.to_device(batch, cpu), step_rng(0, 0, 0))
        outs, tie = forward_parts(model, [task], [batch])
        loss = weighted_losses([task], outs, [batch])[0] + tie
        loss.backward()
        assert torch.isfinite(loss), name
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters()), name
