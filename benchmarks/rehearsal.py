"""8-task rehearsal: the paper's eight task types, App. D.1's sampling weights, 4 SIMT workers.

    python -m benchmarks.rehearsal [--steps 300] [--out docs/rehearsal]

`jobs/gppf_r50.py --data-root` on tiny fake copies of the eight releases (tests/paper_layouts.py:
the real directory layouts and annotation formats of IN-21K, COCO, LVIS, Objects365, Open
Images, ADE20K, COCO-Stuff and VOC; images of a few dozen pixels), with the job's own sampling
weights and heads, a tiny lego backbone (ResNet-10-T, N=2 units per layer, soft routing as in
App. D.1), batch 2 at 64 px and 4 workers, on a local Ray instance. What a 56-GPU run would trip
over shows up here at small scale: a stream that stalls, a task whose data cannot keep up, an
object store or worker memory that keeps growing.

It reports, from metrics.jsonl (one line per step) and from polling the driver's node:
- steps, wall time and step time; the longest step (a stall shows here);
- per task: how many worker-steps sampled it and the seconds a rank waited for its batch (mean,
  95th percentile, max), the first pass's start-up shown apart;
- the object store's peak use (Ray's node stats, polled every 0.5 s);
- each Train worker's peak resident memory and its growth from 10 % to 90 % of the run's time
  (/proc; Linux).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

DET = ("coco", "lvis", "objects365", "openimages")
SEG = ("ade20k", "cocostuff", "voc")


def overrides(run_dir: Path, steps: int, workers: int = 4) -> list[str]:
    sets = [
        "backbone.name=resnet10t",
        "tasks.*.batch_size=2",
        "tasks.*.input_size=64",
        f"scaling.num_workers={workers}",
        "scaling.use_gpu=false",
        "scaling.cpus_per_worker=0.5",
        f"train.steps={steps}",
        "train.log_every=1",  # one metrics line per step: per-step waits and task choices
        f"train.checkpoint_every={max(steps // 2, 1)}",
        "train.eval_at_start=false",
        "train.eval_max_batches=1",
        "optim.lr=0.02",  # the paper's 0.16 is for 56 GPUs at batch 8-96; batch 2 diverges with it
        "optim.warmup_steps=10",
        "data.min_rows_per_pass=16",
        "data.chunk_rows=16",
        f"run_dir={run_dir}",
        "run_name=rehearsal",
    ]
    for t in DET:
        sets += [
            f"tasks.{t}.head.{k}={v}"
            for k, v in (
                ("fpn_channels", 16),
                ("conv_channels", 16),
                ("fc_channels", 32),
                ("anchor_size", 8),
                ("roi_batch_per_image", 32),
                ("rpn_post_nms_train", 64),
                ("rpn_post_nms_test", 32),
            )
        ]
    for t in SEG:
        sets += [f"tasks.{t}.head_channels=16", f"tasks.{t}.aux_channels=8"]
    return [a for s in sets for a in ("--set", s)]


class Monitor:
    """Polls the object store's use and the Train workers' resident memory from the driver."""

    def __init__(self, every_s: float = 0.5):
        self.every = every_s
        self.store_peak = 0
        self.rss: dict[int, list[tuple[float, int]]] = {}  # pid -> [(time, bytes)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from ray._private import internal_api  # private: Ray has no public object-store gauge

        state = None
        while not self._stop.wait(self.every):
            try:
                state = state or internal_api.get_state_from_address()
                reply = internal_api.get_memory_info_reply(state, timeout_seconds=5)
                self.store_peak = max(self.store_peak, reply.store_stats.object_store_bytes_used)
            except Exception:  # Ray not up yet, or shutting down
                state = None
            now = time.time()
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    if b"RayTrainWorker" not in (proc / "cmdline").read_bytes():
                        continue
                    kb = next(
                        int(line.split()[1])
                        for line in (proc / "status").read_text().splitlines()
                        if line.startswith("VmRSS:")
                    )
                except (OSError, StopIteration, ValueError):
                    continue
                self.rss.setdefault(int(proc.name), []).append((now, kb * 1024))


def per_task_waits(lines: list[dict[str, Any]], tasks: list[str]) -> dict[str, dict[str, float]]:
    """Seconds each rank waited for its batch, grouped by the task it sampled that step."""
    import numpy as np

    waits: dict[str, list[float]] = {t: [] for t in tasks}
    first: dict[str, float] = {}
    seen: set[tuple[int, str]] = set()
    for m in lines:
        if "step_time_s" not in m or len(m.get("task_choices", [])) != 1:
            continue
        for r, choice in enumerate(m["task_choices"][0]):
            task, wait = tasks[choice], m[f"data_wait_s/rank{r}"]
            if (r, task) not in seen:  # a rank's first batch of a task pays its stream's start-up
                seen.add((r, task))
                first[task] = max(first.get(task, 0.0), wait)
                continue
            waits[task].append(wait)
    out = {}
    for t in tasks:
        w = np.asarray(waits[t] or [0.0])
        out[t] = {
            "worker_steps": len(waits[t]) + sum(1 for r, task in seen if task == t),
            "mean_s": float(w.mean()),
            "p95_s": float(np.percentile(w, 95)),
            "max_s": float(w.max()),
            "first_batch_max_s": first.get(t, 0.0),
        }
    return out


def rehearse(data_root: Path, run_dir: Path, steps: int, workers: int = 4) -> dict[str, Any]:
    """Run the rehearsal (Ray must be up, or it starts a local instance) and return its report."""
    from gppf.config.base import to_dict
    from gppf.launch.cli import main
    from gppf.presets import gppf_r50 as job
    # The job's two stages, shortened: SIMT over the eight tasks, then LVIS's class-balanced
    # classifier stage on the last tenth of the steps (at least one).
    lvis_steps = max(1, steps // 10) if steps > 1 else 0
    schedule = [to_dict(s) for s in job.stages(steps - lvis_steps, 10, lvis_steps)] if lvis_steps else []
    argv = [
        "--data-root",
        str(data_root),
        *overrides(run_dir, steps, workers),
        "--set",
        f"stages={schedule!r}",
    ]
    t0 = time.time()
    with Monitor() as mon:
        metrics = main(__doc__, job.full_config, job.demo_config, argv)
    wall = time.time() - t0
    run = Path(metrics["run_dir"])
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tasks = list(json.loads((run / "config.json").read_text())["tasks"])
    train = [m for m in lines if "step_time_s" in m]
    step_times = sorted(m["step_time_s"] for m in train[1:]) or [0.0]  # the first holds start-up
    rss = {}
    for pid, samples in sorted(mon.rss.items()):
        values = [b for _, b in samples]
        early, late = values[len(values) // 10], values[len(values) * 9 // 10]
        rss[pid] = {
            "peak_mb": max(values) / 2**20,
            "growth_mb": (late - early) / 2**20,
            # at 10 %, 30 %, 50 %, 70 %, 90 % of the run: a plateau (warm-up) or a line (a leak)
            "profile_mb": [values[len(values) * q // 10] / 2**20 for q in (1, 3, 5, 7, 9)],
        }
    later = train[1:] or train
    return {
        "steps": metrics["step"],
        "wall_s": wall,
        "train_s": sum(m["step_time_s"] for m in train),
        "median_step_s": step_times[len(step_times) // 2],
        "max_step_s": step_times[-1],
        "first_step_s": train[0]["step_time_s"] if train else 0.0,
        "data_wait_fraction": _wait_fraction(train),
        "data_wait_fraction_after_first": _wait_fraction(later),
        "tasks": per_task_waits(lines, tasks),
        "object_store_peak_mb": mon.store_peak / 2**20,
        "worker_rss": rss,
        "final_eval": metrics["final_eval"],
        "run_dir": str(run),
    }


def _wait_fraction(windows: list[dict[str, Any]]) -> float:
    total = sum(m["step_time_s"] for m in windows)
    return sum(m["data_wait_fraction"] * m["step_time_s"] for m in windows) / max(total, 1e-9)


def markdown(r: dict[str, Any]) -> str:
    out = [
        f"{r['steps']} steps in {r['wall_s']:.0f} s (training {r['train_s']:.0f} s; step median "
        f"{r['median_step_s'] * 1000:.0f} ms, longest {r['max_step_s'] * 1000:.0f} ms, first "
        f"{r['first_step_s']:.1f} s); data wait {100 * r['data_wait_fraction']:.1f} % of the training "
        f"time, {100 * r['data_wait_fraction_after_first']:.3f} % after the first step (the streams' "
        f"start-up); object store peak {r['object_store_peak_mb']:.1f} MiB",
        "",
        "| task | worker-steps | wait mean (ms) | wait p95 (ms) | wait max (ms) | first batch (s) |",
        "|---|---|---|---|---|---|",
    ]
    for t, w in r["tasks"].items():
        out.append(
            f"| {t} | {w['worker_steps']} | {w['mean_s'] * 1000:.1f} | {w['p95_s'] * 1000:.1f} | "
            f"{w['max_s'] * 1000:.1f} | {w['first_batch_max_s']:.1f} |"
        )
    out += [
        "",
        "| Train worker (pid) | peak RSS (MiB) | growth, 10 % to 90 % of the run (MiB) |",
        "|---|---|---|",
    ]
    for pid, m in r["worker_rss"].items():
        out.append(f"| {pid} | {m['peak_mb']:.0f} | {m['growth_mb']:+.0f} |")
    return "\n".join(out)


def main_cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--work-dir", default="~/gppf_runs/rehearsal", help="fake data and the run go here")
    ap.add_argument("--out", default=None, help="write rehearsal.json and rehearsal.md into this directory")
    args = ap.parse_args()
    from gppf.dist.ray_env import ensure_ray
    from tests.paper_layouts import make_paper_layouts

    work = Path(args.work_dir).expanduser()
    runs = work / f"runs-{time.strftime('%Y%m%d-%H%M%S')}"
    data = work / "data"
    if not (data / "coco").is_dir():
        make_paper_layouts(data)
    # Logical CPUs: 4 workers x 0.5 plus room for the decode tasks, whatever the core count.
    ensure_ray(num_cpus=max(4, args.workers))
    report = rehearse(data, runs, args.steps, args.workers)
    text = markdown(report)
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "rehearsal.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "rehearsal.md").write_text(text + "\n")


if __name__ == "__main__":
    main_cli()
