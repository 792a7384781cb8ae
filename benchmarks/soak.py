"""Soak run: every bundled task type in one small, fast-stepping SIMT job for many steps, with every
Train worker's resident memory and the object store recorded over the run.

    python -m benchmarks.soak [--steps 10000] [--workers 2] [--out docs/soak]

The job: generated demo data (gppf.data.demo) for classification, detection with masks, semantic
segmentation, depth, partially labelled multi-head data, and the self-supervised rotation, MoCo
and DenseCL tasks; a lego ResNet-10-T with 2 units per layer, batch 2 at 32-64 px, evaluation at
the end only, checkpoints every `--steps / 5` steps, on a local Ray instance. A monitor thread
polls, every few seconds, the step the run has reached (metrics.jsonl), each Train worker's RSS
(/proc) and the object store's use (Ray's node stats).

Growth is judged where warm-up is over: the least-squares slope of each worker's RSS against the
step over the second half of the run, in MiB per 1,000 steps (issue 25 asks for <= 2). It writes
soak.json (every sample and the slopes) and soak.png (RSS and object store against the step).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.rehearsal import Monitor


def tasks(root: Path) -> dict[str, dict[str, Any]]:
    """One task of every bundled type on the demo data, shrunk to step fast."""
    small = {"batch_size": 2}
    det_head = {"fpn_channels": 16, "conv_channels": 16, "fc_channels": 32, "anchor_size": 8}
    ssl = {"data_root": str(root / "segmentation"), "batch_size": 2, "input_size": 32}
    return {
        "cls": {
            "type": "classification",
            "data_root": str(root / "classification"),
            "input_size": 32,
            **small,
        },
        "det": {
            "type": "detection",
            "data_root": str(root / "detection"),
            "input_size": 64,
            "head": det_head,
            **small,
        },
        "seg": {
            "type": "segmentation",
            "data_root": str(root / "segmentation"),
            "num_classes": 4,
            "input_size": 32,
            "head_channels": 16,
            "aux_channels": 8,
            **small,
        },
        "depth": {
            "type": "depth",
            "data_root": str(root / "depth"),
            "input_size": 32,
            "head_channels": 16,
            **small,
        },
        "multihead": {
            "type": "multihead",
            "data_root": str(root / "multihead"),
            "input_size": 32,
            "heads": {
                "seg": {"type": "segmentation", "num_classes": 4, "head_channels": 16, "aux_channels": 8},
                "depth": {"type": "depth", "head_channels": 16, "max_depth": 24.0, "max_depth_eval": 24.0},
            },
            **small,
        },
        "rotation": {"type": "rotation", **ssl},
        "moco": {"type": "moco", **ssl, "dim": 16, "queue_size": 32},
        "densecl": {"type": "densecl", **ssl, "dim": 16, "queue_size": 32, "key_size": 24},
    }


def config(root: Path, run_dir: Path, steps: int, workers: int):
    from gppf.config.job import (
        BackboneConfig,
        JobConfig,
        LegoConfig,
        OptimConfig,
        ScalingConfig,
        StreamConfig,
        TrainConfig,
    )

    return JobConfig(
        name="soak",
        run_dir=str(run_dir),
        run_name="soak",
        tasks=tasks(root),
        backbone=BackboneConfig(name="resnet10t", kind="lego", lego=LegoConfig(num_units=2, mode="hard")),
        optim=OptimConfig(lr=0.02, warmup_steps=50),
        train=TrainConfig(
            steps=steps,
            log_every=50,
            checkpoint_every=max(steps // 5, 1),
            eval_at_start=False,
            eval_max_batches=1,
        ),
        data=StreamConfig(min_rows_per_pass=64, chunk_rows=32, prefetch_batches=2, cpus_per_task=0.5),
        scaling=ScalingConfig(num_workers=workers, cpus_per_worker=0.5),
    )


class StepWatch:
    """The last step metrics.jsonl has reached, read from the file as it grows."""

    def __init__(self, path: Path):
        self.path, self.step, self._pos = path, 0, 0

    def poll(self) -> int:
        if self.path.is_file():
            with open(self.path) as f:
                f.seek(self._pos)
                for line in f:
                    if line.endswith("\n") and '"step_time_s"' in line:
                        self.step = json.loads(line)["step"]
                    self._pos += len(line.encode())
        return self.step


class Samples(Monitor):
    """Rehearsal's monitor (object store peak, Train workers' RSS) plus (time, step, store bytes)."""

    def __init__(self, metrics: Path, every_s: float = 5.0):
        super().__init__(every_s)
        self.watch = StepWatch(metrics)
        self.steps: list[tuple[float, int]] = []
        self.store: list[tuple[float, int]] = []
        self._thread2 = threading.Thread(target=self._steps, daemon=True)

    def __enter__(self) -> Samples:
        self._thread2.start()
        return super().__enter__()

    def _steps(self) -> None:
        from ray._private import internal_api

        state = None
        while not self._stop.wait(self.every):
            self.steps.append((time.time(), self.watch.poll()))
            try:
                state = state or internal_api.get_state_from_address()
                reply = internal_api.get_memory_info_reply(state, timeout_seconds=5)
                self.store.append((time.time(), reply.store_stats.object_store_bytes_used))
            except Exception:  # Ray not up yet, or shutting down
                state = None


def step_at(steps: list[tuple[float, int]], t: float) -> float:
    """The step the run was at, at time t (interpolated between polls)."""
    times, values = zip(*steps) if steps else ((0.0,), (0,))
    return float(np.interp(t, times, values))


def slope_per_1000(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (step, MiB) points, per 1,000 steps."""
    x, y = np.array(points, dtype=float).T
    return float(np.polyfit(x, y, 1)[0] * 1000) if len(x) > 2 and np.ptp(x) > 0 else 0.0


def analyse(mon: Samples, total: int) -> dict[str, Any]:
    workers = {}
    for pid, samples in sorted(mon.rss.items()):
        points = [(step_at(mon.steps, t), b / 2**20) for t, b in samples]
        late = [(s, mb) for s, mb in points if total / 2 <= s < total]
        workers[str(pid)] = {
            "points": points,
            "peak_mb": max(mb for _, mb in points),
            "slope_mb_per_1000_steps_second_half": slope_per_1000(late),
            "slope_mb_per_1000_steps_first_half": slope_per_1000([p for p in points if p[0] < total / 2]),
        }
    store = [(step_at(mon.steps, t), b / 2**20) for t, b in mon.store]
    return {"steps": total, "workers": workers, "object_store_mb": store}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for pid, w in report["workers"].items():
        x, y = zip(*w["points"])
        slope = w["slope_mb_per_1000_steps_second_half"]
        a.plot(x, y, label=f"worker {pid}: {slope:+.2f} MiB / 1k steps (2nd half)")
    a.axvline(report["steps"] / 2, color="grey", lw=0.5)
    a.set(xlabel="step", ylabel="RSS (MiB)", title="Train workers' resident memory")
    a.legend(fontsize=7)
    if report["object_store_mb"]:
        x, y = zip(*report["object_store_mb"])
        b.plot(x, y)
    b.set(xlabel="step", ylabel="MiB", title="object store in use")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work-dir", default="~/gppf_runs/soak", help="demo data and the run go here")
    ap.add_argument("--out", default=None, help="write soak.json and soak.png into this directory")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    args = ap.parse_args(argv)

    from gppf.data.demo import generate
    from gppf.dist.ray_env import ensure_ray
    from gppf.launch.fit import fit

    work = Path(args.work_dir).expanduser()
    root = generate(work / "data", n_train=48, n_val=8, seed=0)
    runs = work / f"runs-{time.strftime('%Y%m%d-%H%M%S')}"
    ensure_ray(num_cpus=max(4, 2 * args.workers))
    cfg = config(root, runs, args.steps, args.workers)
    t0 = time.time()
    with Samples(runs / "soak" / "metrics.jsonl", args.every) as mon:
        result = fit(cfg)
    report = {"wall_s": time.time() - t0, **analyse(mon, result["step"]), "run_dir": result["run_dir"]}
    for pid, w in report["workers"].items():
        first, second = (w[f"slope_mb_per_1000_steps_{h}_half"] for h in ("first", "second"))
        print(
            f"worker {pid}: peak {w['peak_mb']:.0f} MiB; slope {first:+.2f} MiB / 1,000 steps in the "
            f"first half, {second:+.2f} in the second"
        )
    if report["object_store_mb"]:
        print(f"object store: peak {max(mb for _, mb in report['object_store_mb']):.1f} MiB")
    print(f"{result['step']} steps in {report['wall_s']:.0f} s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(report, indent=1))
        plot(report, out / "soak.png")
    return report


if __name__ == "__main__":
    main()
