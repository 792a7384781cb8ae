"""Elastic SIMT on a local multi-node cluster: a job with scaling.min_workers=1, num_workers=2
starts with room for one worker, grows to two when a node joins, and keeps training when that
node is lost; metrics.jsonl logs the world size of every step."""

from __future__ import annotations

import re

from tests.test_local_cluster import _lines, _ray, _wait, cluster  # noqa: F401  (the fixture)

SLOT = '{"trainer_slot": 1}'  # one training worker per node that has this resource


def test_grow_then_shrink(cluster, tmp_path):  # noqa: F811
    env, script = cluster
    # The fixture's node 0 has no trainer slot (it runs data tasks only); node 1 has one.
    script("add-node", "--cpus", "2", "--resources", SLOT)
    runs = tmp_path / "runs"
    sets = [
        "scaling.min_workers=1",
        "scaling.num_workers=2",
        f"scaling.resources_per_worker={SLOT}",
        "scaling.resize_check_s=5",
        "scaling.max_failures=10",
        "train.steps=100000",
        "train.checkpoint_every=10",
        "train.log_every=1",
        "train.eval_at_start=false",
        f"run_dir={runs}",
        "data.chunk_rows=64",
        "data.min_rows_per_pass=64",
    ]
    out = _ray(
        env,
        "job",
        "submit",
        "--no-wait",
        "--submission-id",
        "gppf-elastic",
        "--working-dir",
        ".",
        "--",
        "python",
        "jobs/gppf_r50.py",
        "--tasks",
        "demo_cls,demo_seg",
        "--demo-root",
        str(tmp_path / "demo"),
        "--demo-images",
        "32",
        *[a for s in sets for a in ("--set", s)],
    )
    assert "gppf-elastic" in out, out
    try:
        _wait("8 steps on one worker", lambda: sum(m["world_size"] == 1 for m in _lines(runs)) >= 8)
        script("add-node", "--cpus", "2", "--resources", SLOT)  # index 2
        grown = _wait("the group to grow to 2", lambda: [m for m in _lines(runs) if m["world_size"] == 2])
        _wait("8 steps on two workers", lambda: sum(m["world_size"] == 2 for m in _lines(runs)) >= 8)
        script("kill-node", "2")
        shrink_from = len(_lines(runs))
        _wait(
            "8 steps on one worker after the shrink",
            lambda: sum(m["world_size"] == 1 for m in _lines(runs)[shrink_from:]) >= 8,
            timeout=400,
        )
    finally:
        _ray(env, "job", "stop", "gppf-elastic")
    lines = _lines(runs)
    sizes = [m["world_size"] for m in lines]
    # 1 ... 1, 2 ... 2, 1 ... 1 (a resize restarts from the last checkpoint, so steps repeat)
    collapsed = [s for i, s in enumerate(sizes) if i == 0 or sizes[i - 1] != s]
    assert collapsed[:3] == [1, 2, 1], collapsed
    assert grown[0]["start_step"] % 10 == 0 and grown[0]["start_step"] > 0
    for m in lines:  # a 2-worker step records two task choices, a 1-worker step one
        assert all(len(c) == m["world_size"] for c in m["task_choices"]), m
    logs = _ray(env, "job", "logs", "gppf-elastic")
    assert re.search(r"resumed from checkpoint at step \d+", logs)
