"""The SIMT worker: what every Ray Train worker runs.

One step (DESIGN.md, GPPF §3.2): sample this worker's task from (seed, step, rank), pull a batch
from that task's stream, forward backbone + head, backward (cross-task BN syncs statistics inside),
masked allreduce (each gradient averaged over the workers that used it), optimizer step on the
parameters somebody used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gppf.allreduce import MaskedAllReduce
from gppf.backbone import build_backbone
from gppf.config import from_dict
from gppf.data.stream import TaskStream, configure_data_context, eval_batches
from gppf.job_config import JobConfig
from gppf.lego import gumbel_tau
from gppf.model import MultiTaskModel
from gppf.optim import build_optimizer, build_scheduler
from gppf.registry import build_task
from gppf.sampler import sample_task
from gppf.task import Task

CKPT_FILE = "state.pt"


class NonFiniteLossError(FloatingPointError):
    pass


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_tasks(cfg: JobConfig) -> list[Task]:
    import task_plugins  # noqa: F401  (registers the bundled plugins; entry points cover the rest)

    return [build_task(name, entry) for name, entry in cfg.tasks.items()]


class SIMTWorker:
    def __init__(self, cfg: JobConfig, device: torch.device, tasks: list[Task] | None = None):
        self.cfg = cfg
        self.device = device
        self.rank, self.world = _world()
        self.tasks = tasks if tasks is not None else build_tasks(cfg)
        self.weights = [t.cfg.sampling_weight for t in self.tasks]
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        backbone = build_backbone(cfg.backbone, [t.name for t in self.tasks])
        self.model = MultiTaskModel(backbone, self.tasks).to(device)
        self.controller = getattr(backbone, "controller", None)
        self._broadcast_parameters()
        self.reducer = MaskedAllReduce(list(self.model.parameters()), cfg.train.bucket_mb)
        self.optimizer = build_optimizer(self.model, cfg.optim, cfg.backbone.lego.controller_lr)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        amp_on = cfg.train.amp and device.type == "cuda"
        self.amp_dtype = torch.float16 if cfg.train.amp_dtype == "float16" else torch.bfloat16
        self.autocast = (
            (lambda: torch.autocast("cuda", dtype=self.amp_dtype)) if amp_on else contextlib.nullcontext
        )
        self.scaler = torch.amp.GradScaler("cuda") if amp_on and self.amp_dtype == torch.float16 else None
        self.streams: dict[str, TaskStream] = {}
        self.step = 0
        self.start_step = 0

    def _broadcast_parameters(self) -> None:
        if self.world > 1:
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                dist.broadcast(t.data, src=0)

    def stream(self, task: Task) -> TaskStream:
        if task.name not in self.streams:
            self.streams[task.name] = TaskStream(
                task, self.cfg.train.seed, self.rank, self.world, self.cfg.data
            )
        return self.streams[task.name]

    def task_at(self, step: int) -> int:
        return sample_task(
            self.weights, self.cfg.train.seed, step, self.rank, self.cfg.train.per_batch_sampling
        )

    # ------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """One SIMT step. Returns this step's statistics summed over all workers."""
        t0 = time.perf_counter()
        ti = self.task_at(self.step)
        task = self.tasks[ti]
        batch, wait = self.stream(task).next()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        # Every random draw of this step (dropout, RPN/RoI sampling, Mixup) is a function of
        # (seed, step, rank), so a run resumed from a checkpoint repeats it exactly.
        rng = np.random.default_rng([self.cfg.train.seed, self.step, self.rank, 11])
        torch.manual_seed(int(rng.integers(2**62)))
        batch = task.train_batch(batch, rng)
        self.model.train()
        if self.controller is not None:
            self._set_routing(self.step)
        with self.autocast():
            out, tie = self.model(batch[task.input_key()], task.name, batch)
            loss = task.loss(out, batch) * task.cfg.loss_weight
        (self.scaler.scale(loss + tie) if self.scaler else loss + tie).backward()

        # Per-step stats ride along with the gradients: [nan | loss | steps | samples] per task,
        # then each rank's data wait and task choice in its own slot.
        n = len(self.tasks)
        stats = torch.zeros(4 * n + 2 * self.world, device=self.device)
        finite = bool(torch.isfinite(loss.detach()))
        stats[ti] = 0.0 if finite else 1.0
        stats[n + ti] = loss.detach().float() if finite else 0.0
        stats[2 * n + ti] = 1.0
        stats[3 * n + ti] = batch[task.input_key()].shape[0]
        stats[4 * n + self.rank] = wait
        stats[4 * n + self.world + self.rank] = ti
        summed, _ = self.reducer.reduce(stats)
        summed = summed.cpu()
        if summed[:n].sum() > 0:
            bad = [self.tasks[i].name for i in range(n) if summed[i] > 0]
            raise NonFiniteLossError(f"non-finite loss in task(s) {', '.join(bad)} at step {self.step}")

        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # None = "unused" for the next masked allreduce
        self.scheduler.step()
        self.step += 1
        choices = [int(c) for c in summed[4 * n + self.world :].tolist()]
        return {
            "task": task.name,
            "stats": summed[: 4 * n + self.world],
            "choices": choices,
            "wait": wait,
            "time": time.perf_counter() - t0,
        }

    def _set_routing(self, step: int) -> None:
        """Gumbel temperature and noise for this step: a pure function of (seed, step, rank)."""
        lego = self.cfg.backbone.lego
        bb = self.model.backbone
        bb.tau = gumbel_tau(step, self.cfg.train.steps, lego.tau_start, lego.tau_end, lego.tau_decay_fraction)
        seed = int(np.random.default_rng([self.cfg.train.seed, step, self.rank, 7]).integers(2**62))
        bb.generator = torch.Generator().manual_seed(seed)

    def routes(self) -> dict[str, dict[str, Any]]:
        """Per task: the arg-max unit per lego layer and the selection probabilities."""
        if self.controller is None:
            return {}
        return {
            t.name: {
                "route": self.controller.route(t.name),
                "probs": self.controller.probabilities(t.name).detach().cpu().tolist(),
            }
            for t in self.tasks
        }

    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, max_batches: int = 0) -> dict[str, dict[str, float]]:
        """Every worker evaluates its share of each task's validation split; states are summed."""
        self.model.eval()
        results = {}
        for task in self.tasks:
            ev = task.evaluator()
            for batch in eval_batches(task, self.rank, self.world, self.cfg.data, max_batches):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with self.autocast():
                    out, _ = self.model(batch[task.input_key()], task.name, batch)
                ev.update(out.float() if torch.is_tensor(out) else out, batch)
            ev.synchronize(self.device)
            results[task.name] = ev.compute()
        self.model.train()
        return results

    # ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        streams = {name: s.state() for name, s in self.streams.items()}
        all_streams: list[Any] = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(all_streams, streams)
        else:
            all_streams = [streams]
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "streams": all_streams,  # per rank: {task: {pass_idx, taken}}
            "world_size": self.world,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        streams = state.get("streams") or []
        # Same world size: each rank continues its own streams where they stopped. Otherwise the
        # shares changed anyway, so every stream starts the pass after the furthest old one.
        for task in self.tasks:
            if state.get("world_size") == self.world and self.rank < len(streams):
                if task.name in streams[self.rank]:
                    self.stream(task).load_state(streams[self.rank][task.name])
                continue
            passes = [s[task.name]["pass_idx"] for s in streams if task.name in s]
            if passes:
                self.stream(task).load_state({"pass_idx": max(passes) + 1, "taken": 0})

    def close(self) -> None:
        for s in self.streams.values():
            s.close()


def save_checkpoint(state: dict[str, Any], directory: str) -> None:
    """Write state.pt atomically: into a temporary file, flushed to disk, then renamed over the old
    one. A crash at any point leaves the previous state.pt (or none), never a torn one. (Ray Train
    then copies the directory to storage and registers it only once the copy is complete.)"""
    path = Path(directory) / CKPT_FILE
    tmp = path.with_name(CKPT_FILE + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(directory: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(Path(directory) / CKPT_FILE, map_location=map_location, weights_only=True)


# ----------------------------------------------------------------------------------------
def _quiet_ray_train_reports() -> None:
    """Ray Train V2 logs every `report` at INFO with its whole metrics dict (each rank's task for
    every step of the window), from every rank: kilobytes per report that bury the platform's own
    one-line progress. Its logger is named after its file."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: keep its logging as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker (`TorchTrainer(train_loop_per_worker=...)`)."""
    import ray.train

    _quiet_ray_train_reports()
    cfg = from_dict(JobConfig, config["job"], where="config")
    ctx = ray.train.get_context()
    threads = cfg.train.torch_threads or max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size()))
    torch.set_num_threads(threads)
    configure_data_context(cfg.data)
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if cfg.scaling.use_gpu else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    w = SIMTWorker(cfg, device)
    ckpt = ray.train.get_checkpoint()  # set when Ray Train restarts the worker group
    if ckpt is None and config.get("resume_from"):
        ckpt = ray.train.Checkpoint.from_directory(config["resume_from"])
    initial_eval: dict[str, Any] = {}
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(d)
        w.load_state_dict(state)
        initial_eval = state.get("initial_eval", {})
        if w.rank == 0:
            _say(f"[gppf] resumed from checkpoint at step {w.step}")
    elif cfg.train.eval_at_start:
        initial_eval = w.evaluate(cfg.train.eval_max_batches)

    w.start_step = w.step
    logger = _Logger(cfg, w) if w.rank == 0 else None
    n = len(w.tasks)
    window = torch.zeros(4 * n + w.world)
    choices: list[list[int]] = []  # per step of the window: each rank's task index
    window_time = 0.0
    metrics: dict[str, Any] = {"step": w.step, "start_step": w.start_step}
    try:
        while w.step < cfg.train.steps:
            out = w.train_step()
            window += out["stats"]
            choices.append(out["choices"])
            window_time += out["time"]
            last = w.step == cfg.train.steps
            log_now = w.step % cfg.train.log_every == 0 or last
            ckpt_now = last or (cfg.train.checkpoint_every > 0 and w.step % cfg.train.checkpoint_every == 0)
            if not (log_now or ckpt_now):
                continue
            metrics = _window_metrics(w, window, window_time)
            metrics["task_choices"] = list(choices)  # steps step-len+1 .. step, one list per step
            if w.controller is not None:
                metrics["routes"] = w.routes()
                metrics["tau"] = w.model.backbone.tau
            if log_now:
                if logger:
                    logger.log(w.step, metrics)
                window.zero_()
                choices.clear()
                window_time = 0.0
            # ray.train.report is a barrier: every rank reaches this at the same steps.
            _report(w, metrics, ckpt_now, initial_eval)
        # The final weights are checkpointed above, before evaluation can fail; the evaluated
        # report carries a checkpoint too, because Result.metrics keeps only those.
        final_eval = w.evaluate(cfg.train.eval_max_batches)
        if logger:
            logger.log_eval(w.step, final_eval)
        _report(w, {**metrics, "final_eval": final_eval, "initial_eval": initial_eval}, True, initial_eval)
    finally:
        w.close()
        if logger:
            logger.close()


def _say(msg: str) -> None:
    # To the process's real stdout: Ray Train V2 patches print() to also log each line, which
    # shows every progress line twice in the driver's output.
    print(msg, file=sys.__stdout__, flush=True)


def _window_metrics(w: SIMTWorker, window: torch.Tensor, seconds: float) -> dict[str, Any]:
    n = len(w.tasks)
    steps = window[2 * n : 3 * n]
    total_steps = max(steps.sum().item() / max(w.world, 1), 1.0)
    m: dict[str, Any] = {
        "step": w.step,
        "start_step": w.start_step,
        "lr": w.scheduler.get_last_lr()[0],
        "world_size": w.world,
    }
    for i, t in enumerate(w.tasks):
        if steps[i] > 0:
            m[f"loss/{t.name}"] = (window[n + i] / steps[i]).item()
        m[f"worker_steps/{t.name}"] = int(steps[i].item())
        m[f"images_per_s/{t.name}"] = window[3 * n + i].item() / max(seconds, 1e-9)
    waits = window[4 * n :]
    m["data_wait_fraction"] = waits.mean().item() / max(seconds, 1e-9)
    for r, wait in enumerate(waits.tolist()):
        m[f"data_wait_s/rank{r}"] = wait
    m["step_time_s"] = seconds / total_steps
    return m


def _report(w: SIMTWorker, metrics: dict[str, Any], checkpoint: bool, initial_eval: dict[str, Any]) -> None:
    import ray.train

    if not checkpoint:
        ray.train.report(metrics)
        return
    state = w.state_dict()  # collective (gathers stream positions): every rank calls it
    state["initial_eval"] = initial_eval
    if w.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(state, d)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


class _Logger:
    """Rank 0's TensorBoard scalars and progress lines."""

    def __init__(self, cfg: JobConfig, w: SIMTWorker):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(cfg.run_dir).expanduser().absolute() / cfg.run_name / "tensorboard"
        self.writer = SummaryWriter(str(self.dir))
        self.jsonl = open(self.dir.parent / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        self.total = cfg.train.steps
        self.has_routes = False
        self.t0 = time.time()

    def log(self, step: int, m: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(m) + "\n")
        self.jsonl.flush()
        self.has_routes = self.has_routes or "routes" in m
        for task, r in m.get("routes", {}).items():  # selection probabilities over training (Fig. 11)
            for layer, probs in enumerate(r["probs"]):
                for unit, p in enumerate(probs):
                    self.writer.add_scalar(f"select/{task}/layer{layer:02d}/unit{unit}", p, step)
        for k, v in m.items():
            if isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(k, v, step)
        losses = " ".join(f"{k[5:]}={v:.3f}" for k, v in m.items() if k.startswith("loss/"))
        _say(
            f"[gppf] step {step}/{self.total} {losses} lr={m['lr']:.4f} "
            f"data_wait={100 * m['data_wait_fraction']:.1f}% step={m['step_time_s'] * 1000:.0f}ms "
            f"elapsed={time.time() - self.t0:.0f}s"
        )

    def log_eval(self, step: int, results: dict[str, dict[str, float]]) -> None:
        for task, metrics in results.items():
            for k, v in metrics.items():
                self.writer.add_scalar(f"val/{task}/{k}", v, step)

    def close(self) -> None:
        self.jsonl.close()
        try:
            if self.has_routes:  # selection plots (GPPF Fig. 3 and 11) next to the logs
                import numpy as np
                from PIL import Image

                from gppf.plots import draw

                for path in draw(self.dir.parent):
                    img = np.asarray(Image.open(path).convert("RGB"))
                    self.writer.add_image(f"selection/{path.stem}", img, self.total, dataformats="HWC")
        finally:  # a failed plot must not lose the TensorBoard events already buffered
            self.writer.close()
