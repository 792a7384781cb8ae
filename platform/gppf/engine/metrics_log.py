"""Metric windows and rank 0's logs: metrics.jsonl, TensorBoard scalars and one progress line.

A window sums the per-step payload (`gppf.dist.payload`) over the steps between two log lines and
turns it into per-task losses, images/s, data-wait fractions and step time; a slot another
component registered is reported under its name, as its sum over workers averaged over the
window's steps. Evaluation results
travel as `{"eval": {task: {metric: value}}}` in the same line; TensorBoard gets them as
`val/<task>/<metric>`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gppf.api.hooks import StepOutput
    from gppf.engine.trainer import Trainer


def duration(seconds: float) -> str:
    """45s, 4m10s, 2h03m: short enough for a progress line."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def say(msg: str) -> None:
    """A progress line on the process's real stdout: Ray Train V2 patches print() to also log each
    line, which shows every progress line twice in the driver's output."""
    print(msg, file=sys.__stdout__, flush=True)


BUILTIN_SLOTS = ("nonfinite", "loss", "steps", "samples", "data_wait", "task_choice", "rank0_reports")


class MetricWindow:
    """The steps since the last log line: summed payloads, each step's task choices, seconds."""

    def __init__(self, trainer: Trainer):
        self.payload = trainer.payload
        self.mask = self.payload.windowed_mask()
        self.reset()

    def reset(self) -> None:
        self.sum = torch.zeros(self.payload.size)
        self.choices: list[list[int]] = []
        self.seconds = 0.0

    def add(self, out: StepOutput) -> None:
        self.sum += out.stats * self.mask
        self.choices.append([int(c) for c in self.payload.view(out.stats, "task_choice").tolist()])
        self.seconds += out.seconds

    def metrics(self, t: Trainer) -> dict[str, Any]:
        view = lambda name: self.payload.view(self.sum, name)  # noqa: E731
        steps, losses, samples, waits = view("steps"), view("loss"), view("samples"), view("data_wait")
        seconds = max(self.seconds, 1e-9)
        m: dict[str, Any] = {
            "step": t.step,
            "start_step": t.start_step,
            "stage": t.plan.stages[t.plan.index_at(max(t.step - 1, 0))].name,
            "lr": t.scheduler.get_last_lr()[0],
            "world_size": t.world,
        }
        for i, task in enumerate(t.tasks):
            if steps[i] > 0:
                m[f"loss/{task.name}"] = (losses[i] / steps[i]).item()
            m[f"worker_steps/{task.name}"] = int(steps[i].item())
            m[f"images_per_s/{task.name}"] = samples[i].item() / seconds
        m["data_wait_fraction"] = waits.mean().item() / seconds
        for r, wait in enumerate(waits.tolist()):
            m[f"data_wait_s/rank{r}"] = wait
        m["step_time_s"] = seconds / max(steps.sum().item() / max(t.world, 1), 1.0)
        m["task_choices"] = list(self.choices)  # one list per step of the window: each rank's task
        for name, slot in self.payload.slots.items():  # slots other components registered
            if name not in BUILTIN_SLOTS and slot.windowed:
                per_step = (view(name) / max(len(self.choices), 1)).tolist()
                m[name] = per_step[0] if slot.size == 1 else per_step
        routes = t.model.backbone.routes()
        if routes:
            m["routes"] = routes
            m["tau"] = t.model.backbone.tau
        return m


class MetricsLogger:
    """Rank 0's writer of metrics.jsonl, TensorBoard and the terminal's progress lines."""

    def __init__(self, run_dir: Path, total_steps: int):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        self.total = total_steps
        self.t0 = time.time()
        self.first: tuple[float, int] | None = None  # (time, step) of this attempt's first window

    def log(self, m: dict[str, Any]) -> None:
        step = m["step"]
        self.jsonl.write(json.dumps(m) + "\n")
        self.jsonl.flush()
        for task, r in m.get("routes", {}).items():  # selection probabilities over training (Fig. 11)
            for layer, probs in enumerate(r["probs"]):
                for unit, p in enumerate(probs):
                    self.writer.add_scalar(f"select/{task}/layer{layer:02d}/unit{unit}", p, step)
        for k, v in m.items():
            if isinstance(v, (int, float)) and k not in ("step", "start_step"):
                self.writer.add_scalar(k, v, step)
        if "step_time_s" in m:  # a training window (an evaluation at step 0 has none)
            losses = " ".join(f"{k[5:]}={v:.3f}" for k, v in m.items() if k.startswith("loss/"))
            say(
                f"[gppf] step {step}/{self.total} {losses} lr={m['lr']:.4f} "
                f"data_wait={100 * m['data_wait_fraction']:.1f}% step={m['step_time_s'] * 1000:.0f}ms "
                f"elapsed={duration(time.time() - self.t0)} eta={duration(self.eta(step, m['step_time_s']))}"
            )
        if m.get("eval"):
            for task, metrics in m["eval"].items():
                for k, v in metrics.items():
                    self.writer.add_scalar(f"val/{task}/{k}", v, step)
            shown = "; ".join(
                f"{task} " + " ".join(f"{k}={v:.2f}" for k, v in metrics.items())
                for task, metrics in m["eval"].items()
            )
            say(f"[gppf] eval at step {step}: {shown}")

    def eta(self, step: int, step_time_s: float) -> float:
        """Seconds to the last step at the rate since this attempt's first window (which holds
        the start-up, so it is left out), or at the first window's step time before there is one."""
        now = time.time()
        if self.first is None:
            self.first = (now, step)
        t, s = self.first
        rate = (now - t) / (step - s) if step > s else step_time_s
        return max(self.total - step, 0) * rate

    def add_image(self, tag: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.jsonl.close()
        self.writer.close()


def flat_eval(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task: {metric: v}} as `val/<task>/<metric>` scalars (for Ray Train reports and Tune)."""
    return {f"val/{task}/{k}": v for task, m in results.items() for k, v in m.items()}
