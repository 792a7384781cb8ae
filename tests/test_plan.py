"""The step planner (`--plan`): the expected-maximum step time against hand-worked and enumerated
examples, batch suggestions within the memory cap, and `jobs/gppf_r50.py --plan` on the demo."""

from __future__ import annotations

import itertools
import math
import re

import pytest

from gppf.tools.capacity import Line, TaskPlan, expected_max, idle_fraction, suggest_batches


def test_expected_max_hand_worked():
    # Two tasks of 1 s and 3 s, drawn half and half by 2 workers: the step takes 1 s only when
    # both draw the fast task (1/4), else 3 s: 0.25 * 1 + 0.75 * 3 = 2.5 s. The work is worth
    # 0.5 * 1 + 0.5 * 3 = 2 s a rank, so 1 - 2 / 2.5 = 20 % is idle.
    assert expected_max([1.0, 3.0], [0.5, 0.5], 2) == pytest.approx(2.5)
    assert idle_fraction([1.0, 3.0], [0.5, 0.5], 2) == pytest.approx(0.2)
    # Unnormalised weights and an unsorted order give the same; one worker never idles.
    assert expected_max([3.0, 1.0], [2.0, 2.0], 2) == pytest.approx(2.5)
    assert idle_fraction([3.0, 1.0, 2.0], [1, 2, 3], 1) == pytest.approx(0.0)


def test_expected_max_equals_enumeration():
    times, probs = [0.3, 1.7, 0.9, 1.7], [0.1, 0.2, 0.3, 0.4]
    for world in (1, 3, 4):
        exact = sum(
            math.prod(probs[i] for i in draw) * max(times[i] for i in draw)
            for draw in itertools.product(range(len(times)), repeat=world)
        )
        assert expected_max(times, probs, world) == pytest.approx(exact)


def _plan(name: str, weight: float, batch: int, time: Line, memory: Line) -> TaskPlan:
    return TaskPlan(name, weight, batch, batch, time(batch), memory(batch), time, memory)


def test_suggested_batches_even_the_times_out_within_the_memory_cap():
    fast = _plan("cls", 0.5, 64, Line(0.01, 0.001), Line(1e8, 1e6))  # 74 ms
    slow = _plan("det", 0.5, 8, Line(0.05, 0.05), Line(2e8, 4e8))  # 450 ms
    plans = [fast, slow]
    target = 0.5 * fast.seconds + 0.5 * slow.seconds
    better = suggest_batches(plans, cap=8e9)
    assert better == {"cls": round(fast.time_line.solve(target)), "det": round(slow.time_line.solve(target))}
    new = [p.time_line(better[p.name]) for p in plans]
    assert idle_fraction(new, [0.5, 0.5], 8) < idle_fraction([p.seconds for p in plans], [0.5, 0.5], 8)
    capped = suggest_batches(plans, cap=1.5e8)  # cls could take more images, but not in 150 MB
    assert capped["cls"] == int(fast.memory_line.solve(1.5e8)) == 50


def test_plan_on_the_demo_prints_every_task_and_the_simt_estimate(tmp_path, ray_session, capsys):
    from gppf.launch.cli import main
    from tests.test_jobs import ALL_JOBS, load_job

    mod = load_job(next(p for p in ALL_JOBS if p.stem == "gppf_r50"))
    # Its own small demo data: the job's --demo-images would rewrite the session's shared demo_root.
    # A memory cap no batch of 3 or more fits in: each such task is measured at batch 2 and scaled,
    # and the planner says so.
    argv = [
        "--demo-root",
        str(tmp_path / "demo"),
        "--demo-images",
        "32",
        "--plan",
        "--plan-memory-gb",
        "0.0001",
    ]
    out = main(mod.__doc__, mod.full_config, mod.demo_config, argv)
    text = capsys.readouterr().out
    assert out["plan"] in text
    for task in ("demo_cls", "demo_det", "demo_seg"):
        row = re.search(rf"\n {task}\s*\| ([\d.]+)\s*\| (\d+)\s*\| (\d+)\s*\| (\d+)\s*\| ([\d.]+)", text)
        assert row, text
        weight, batch, ms, mb, images = row.groups()
        if int(batch) > 2:
            assert re.search(
                rf"plan: {task} at batch {batch} would need ~[\d.]+ GB, over the memory cap", text
            )
            assert re.search(rf"\n {task}\s*\|.*\| measured at batch 2, scaled \(memory cap\)", text), text
        assert int(ms) > 0 and int(mb) > 0
        # images/s and step ms are both rounded displays of one measurement: the printed images/s
        # (to its last decimal) must be reachable from some step time that rounds to the printed ms.
        # (Comparing them to 1 % was a flake: 4.7 printed against 4.7506 from the rounded ms.)
        half = 0.5 * 10 ** -len(images.split(".")[1])
        fastest, slowest = int(batch) * 1000 / (int(ms) - 0.5), int(batch) * 1000 / (int(ms) + 0.5)
        assert float(images) - half <= fastest and float(images) + half >= slowest, (images, batch, ms)
    assert re.search(r"SIMT with 2 workers: expected step \d+ ms", text), text
    assert "suggested batch sizes" in text or "already as even" in text
