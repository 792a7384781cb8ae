"""The step planner (`python jobs/<job>.py --plan`): what one SIMT step will cost, before launching.

Per task, one forward+backward at its configured batch and input size on the local device (CPU,
or one GPU when the job uses GPUs), through the trainer's own forward and loss: step time, peak
memory (GPU: `max_memory_allocated`; CPU: the bytes autograd saves for backward) and images/s.

A SIMT step waits for its slowest rank, so with W workers each drawing task t with probability
p_t, the expected step time is the expected maximum of W independent draws of the per-task time:

    E[max] = sum_k t_(k) * (F_k^W - F_(k-1)^W),   t_(1) <= ... <= t_(n),   F_k = p_(1) + ... + p_(k)

while the work done is worth E[mean] = sum_t p_t t_t per rank; 1 - E[mean] / E[max] is the idle
fraction the imbalance costs. Per-task batch sizes that bring every task's time near E[mean]
(within a memory cap) shrink it; the planner suggests them from a line fitted through two
measured batch sizes. Gradient all-reduce and data loading are not in these figures.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gppf.engine.composite import sampling_weights

if TYPE_CHECKING:
    from gppf.api.task import Task
    from gppf.config.job import JobConfig
    from gppf.models.model import MultiTaskModel


def expected_max(times: list[float], probs: list[float], world: int) -> float:
    """E[max over `world` independent draws] of a task time, task t drawn with probs[t]."""
    total = sum(probs)
    if total <= 0:
        raise ValueError("expected_max: the sampling weights sum to 0")
    out, before = 0.0, 0.0
    for t, p in sorted(zip(times, probs)):
        upto = before + p / total
        out += t * (upto**world - before**world)
        before = upto
    return out


def idle_fraction(times: list[float], probs: list[float], world: int) -> float:
    mean = sum(t * p for t, p in zip(times, probs)) / sum(probs)
    return 1.0 - mean / expected_max(times, probs, world)


@dataclass
class Line:
    """y = a + b * batch, through two measurements (through the origin with one)."""

    a: float
    b: float

    @classmethod
    def fit(cls, x0: int, y0: float, x1: int, y1: float) -> Line:
        if x1 == x0:
            return cls(0.0, y1 / x1)
        b = max((y1 - y0) / (x1 - x0), 1e-12)
        return cls(max(y1 - b * x1, 0.0), b)

    def __call__(self, batch: float) -> float:
        return self.a + self.b * batch

    def solve(self, y: float) -> float:
        return (y - self.a) / self.b


@dataclass
class TaskPlan:
    name: str
    weight: float  # sampling probability (normalised)
    batch: int  # configured
    measured_batch: int  # what ran; < batch when the configured batch would exceed the memory cap
    seconds: float  # forward + backward at `batch` (scaled from `measured_batch` if it differs)
    memory: float  # bytes at `batch` (likewise)
    time_line: Line
    memory_line: Line

    @property
    def images_per_s(self) -> float:
        return self.batch / self.seconds


def _one_batch(task, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """A training batch of `batch_size` through the task's own raw rows and `preprocess`, as the
    stream's decode tasks make it, here in this process (units repeated when the split is smaller)."""
    from gppf.data.stream import row_reader
    from gppf.io.batches import collate_numpy

    src = task.source("train")
    need = math.ceil(batch_size / max(src.rows_per_unit, 1))
    if not src.units:
        raise ValueError(f"task {task.name!r}: its train split is empty")
    units = (src.units * math.ceil(need / len(src.units)))[:need]
    rows = {k: v[:batch_size] for k, v in row_reader(src)(units).items()}
    return collate_numpy(task.preprocess(rows, train=True, seed=seed))


def _cut(batch: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {k: v[:n] for k, v in batch.items()}


@dataclass
class Probe:
    """What one measurement needs: the model, the job's tasks, its step-0 trunk state, autocast."""

    cfg: JobConfig
    model: MultiTaskModel
    tasks: list[Task]
    device: torch.device

    def __post_init__(self) -> None:
        from gppf.api.trunk import StepState
        from gppf.engine.stages import StagePlan, frozen_modules, frozen_parameters
        from gppf.engine.step import autocast_for

        o = self.cfg.optim
        plan = StagePlan(self.cfg.stages, sampling_weights(self.tasks), self.cfg.train.steps, o.warmup_steps)
        self.state = StepState(self.cfg.train.seed, 0, 0, *plan.tau_clock(0))
        self.autocast = autocast_for(self.cfg.train, self.device)
        # The first stage as the trainer enters it: what it freezes neither trains nor updates BN.
        stage = plan.stages[0]
        where = f"stages[0] ({stage.name})"
        frozen = frozen_parameters(self.model, stage.freeze, where, stage.train_only)
        for name, p in self.model.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        self.model.train()
        for m in frozen_modules(self.model, frozen):
            m.eval()
        for t in self.tasks:
            t.enter_stage(self.model.heads[t.name], stage.task_options.get(t.name, {}), where)


def _measure(probe: Probe, parts: list[int], batches: list[dict]) -> tuple[float, float]:
    """(seconds, peak bytes) of one forward + backward of the step that samples parts[0], through
    the trainer's own step functions (gppf.engine.step)."""
    from gppf.engine.step import forward_parts, step_rng, weighted_losses

    device, tasks = probe.device, [probe.tasks[i] for i in parts]
    batches = [t.to_device(b, device) for t, b in zip(tasks, batches)]
    rng = step_rng(probe.cfg.train.seed, 0, 0)
    batches = [t.train_batch(b, rng) for t, b in zip(tasks, batches)]
    saved: dict[tuple[int, int], int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":  # unique storages: a view saved twice costs its bytes once
            key = (x.untyped_storage().data_ptr(), x.untyped_storage().nbytes())
            saved[key] = key[1]
        return x

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    probe.model.backbone.set_step(probe.state)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), probe.autocast():
        outs, tie = forward_parts(probe.model, tasks, batches)
        loss = sum(weighted_losses(tasks, outs, batches)) + tie
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    probe.model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else sum(saved.values())
    return seconds, float(peak)


def default_memory_cap(device: torch.device, world: int) -> float:
    """Bytes one worker may use: 90 % of the GPU, or of the available RAM shared by the workers that
    fit on this machine."""
    if device.type == "cuda":
        return 0.9 * torch.cuda.get_device_properties(device).total_memory
    import psutil

    return 0.9 * psutil.virtual_memory().available / max(1, min(world, torch.get_num_threads()))


def measure(cfg: JobConfig, memory_cap: float | None = None, say=print) -> tuple[list[TaskPlan], str, float]:
    """Measure every sampled task's step on this machine: the plans, the device's name and the
    memory cap (bytes per worker) that was applied. `cfg` is resolved (gppf.launch.fit.resolve:
    data checked, derived values filled in)."""
    from gppf.api.registry import build_tasks
    from gppf.dist.ray_env import ensure_ray
    from gppf.engine.composite import attached_tasks
    from gppf.models.build import build_model

    ensure_ray()
    use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    cap = memory_cap or default_memory_cap(device, cfg.scaling.num_workers)
    tasks = build_tasks(cfg)
    torch.manual_seed(cfg.train.seed)  # the trainer's initial weights
    model = build_model(cfg, tasks).to(device)
    measured = Probe(cfg, model, tasks, device)
    attached = attached_tasks(tasks)
    weights = sampling_weights(tasks)
    total = sum(weights.values())
    plans = []
    for i, task in enumerate(tasks):
        if weights[task.name] <= 0:
            continue  # an attached task runs inside its target's step
        parts = [i, *attached.get(i, [])]
        size = task.cfg.batch_size
        say(f"[gppf] plan: {task.name} (batch {size}) ...")
        full = [_one_batch(tasks[j], tasks[j].cfg.batch_size, cfg.train.seed) for j in parts]
        probe = min(size, 2)
        _measure(measured, parts, [_cut(b, probe) for b in full])  # warm-up (allocator, lazy init)
        t_probe, m_probe = _measure(measured, parts, [_cut(b, probe) for b in full])
        run = size
        if size > probe and m_probe * size / probe > cap:  # linear in batch: would not fit
            run = max(probe, int(cap / m_probe * probe))
            need = m_probe * size / probe / 2**30
            say(
                f"[gppf] plan: {task.name} at batch {size} would need ~{need:.1f} GB, "
                f"over the memory cap of {cap / 2**30:.1f} GB per worker (--plan-memory-gb): measuring "
                f"batch {run} and scaling its time and memory to {size}"
            )
        if run > probe:
            t_run, m_run = _measure(measured, parts, [_cut(b, run) for b in full])
        else:
            t_run, m_run = t_probe, m_probe
        time_line, memory_line = Line.fit(probe, t_probe, run, t_run), Line.fit(probe, m_probe, run, m_run)
        plans.append(
            TaskPlan(
                task.name,
                weights[task.name] / total,
                size,
                run,
                time_line(size) if run != size else t_run,
                memory_line(size) if run != size else m_run,
                time_line,
                memory_line,
            )
        )
    name = torch.cuda.get_device_name(device) if use_gpu else f"CPU ({torch.get_num_threads()} threads)"
    return plans, name, cap


def suggest_batches(plans: list[TaskPlan], cap: float) -> dict[str, int]:
    """Per-task batch sizes whose step times come near the sampling-weighted mean time, each
    within the memory cap."""
    target = sum(p.weight * p.seconds for p in plans)
    out = {}
    for p in plans:
        fits = max(1, int(p.memory_line.solve(cap)))
        out[p.name] = int(min(max(1, round(p.time_line.solve(target))), fits))
    return out


def report(plans: list[TaskPlan], world: int, device: str, cap: float) -> str:
    from gppf.tools.tables import text_table

    times, probs = [p.seconds for p in plans], [p.weight for p in plans]
    rows = [("task", "weight", "batch", "step ms", "peak MB", "images/s", "note")]
    for p in plans:
        scaled = p.measured_batch != p.batch
        note = f"measured at batch {p.measured_batch}, scaled (memory cap)" if scaled else ""
        rows.append(
            (
                p.name,
                f"{p.weight:.3f}",
                str(p.batch),
                f"{1000 * p.seconds:.0f}",
                f"{p.memory / 2**20:.0f}",
                f"{p.images_per_s:.1f}" if p.images_per_s >= 1 else f"{p.images_per_s:.3f}",
                note,
            )
        )
    kind = "max_memory_allocated" if "CPU" not in device else "saved activations"
    lines = [
        f"[gppf] step plan on {device}: one forward+backward per task; peak memory = {kind}",
        text_table(rows),
    ]
    step = expected_max(times, probs, world)
    imgs = sum(p.weight * p.batch for p in plans) * world / step
    lines.append(
        f"SIMT with {world} workers: expected step {1000 * step:.0f} ms (the slowest rank's task), "
        f"{imgs:.1f} images/s in all, idle fraction {100 * idle_fraction(times, probs, world):.1f} %"
    )
    if len(plans) > 1:
        better = suggest_batches(plans, cap)
        new = [p.time_line(better[p.name]) for p in plans]
        shown = ", ".join(f"{p.name}={better[p.name]}" for p in plans if better[p.name] != p.batch)
        if shown:
            lines.append(
                f"suggested batch sizes (memory cap {cap / 2**30:.1f} GB per worker): {shown} -> expected "
                f"step {1000 * expected_max(new, probs, world):.0f} ms, idle fraction "
                f"{100 * idle_fraction(new, probs, world):.1f} % (set tasks.<name>.batch_size; it also "
                "changes each task's share of the images)"
            )
        else:
            lines.append("the configured batch sizes are already as even as the memory cap allows")
    return "\n".join(lines)


def plan(cfg: JobConfig, memory_cap_gb: float | None = None) -> str:
    """Measure and print the plan for the resolved `cfg` (the `--plan` command)."""
    plans, device, cap = measure(cfg, memory_cap_gb * 2**30 if memory_cap_gb else None)
    text = report(plans, cfg.scaling.num_workers, device, cap)
    print(text, flush=True)
    return text
