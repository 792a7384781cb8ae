"""The SIMT trainer: one worker's model, optimizer, streams and step, and the loop that calls hooks.

One step (DESIGN.md, GPPF §3.2): sample this worker's task from (seed, step, rank), pull a batch
from that task's stream, forward trunk + head, backward (cross-task BN syncs statistics inside),
masked allreduce (each gradient averaged over the workers that used it), optimizer step on the
parameters somebody used. Everything around the step (stages, evaluation, checkpoints, logs,
plots, Ray Train reports) is a hook (`gppf.engine.hooks`):

    before_train -> [before_step -> train_step (-> after_optimizer_step) -> after_step]* -> after_train
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from gppf.api.heads import SyncsAcrossRanks, claims
from gppf.api.hooks import PendingReport, StepOutput
from gppf.api.registry import build_tasks
from gppf.api.task import Task
from gppf.api.trunk import StepState
from gppf.config.job import NEEDS_SIZES, JobConfig
from gppf.data.stream import TaskStream
from gppf.data.subsets import train_size
from gppf.dist.allreduce import MaskedAllReduce
from gppf.dist.eval_group import init_eval_group
from gppf.dist.payload import StepPayload
from gppf.engine.composite import attached_tasks, sampling_weights
from gppf.engine.evaluation import evaluate
from gppf.engine.optim import build_optimizer
from gppf.engine.sampler import TaskSampler
from gppf.engine.stages import StagePlan, check_task_options, frozen_modules, frozen_parameters
from gppf.engine.step import autocast_for, forward_parts, step_rng, weighted_losses
from gppf.io.checkpoint import LoadReport, load_weights, read_weights
from gppf.models.build import build_model
from gppf.models.weight_formats import load_backbone

if TYPE_CHECKING:
    from gppf.api.hooks import Hook


class NonFiniteLossError(FloatingPointError):
    pass


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """One worker's SIMT training. `run()` trains to the end of the plan, calling the hooks.

    `initialise=False` skips `model.init_from` / `backbone.init_from` (a resumed run loads a
    checkpoint over everything anyway)."""

    def __init__(
        self,
        cfg: JobConfig,
        device: torch.device,
        tasks: list[Task] | None = None,
        hooks: Sequence[Hook] = (),
        initialise: bool = True,
    ):
        self.cfg = cfg
        self.device = device
        self.rank, self.world = world()
        init_eval_group(cfg.train.eval_timeout_s)
        # The gradient buckets have their own group: sent from backward hooks, they would otherwise
        # interleave with cross-task BN's backward collectives in a different order on each rank.
        timeout = timedelta(seconds=cfg.train.collective_timeout_s)
        self.grad_group = dist.new_group(timeout=timeout) if self.world > 1 else None
        self.reducer: MaskedAllReduce | None = None
        mode = cfg.train.overlap_allreduce
        self.overlap = mode == "on" or (mode == "auto" and device.type == "cuda")
        self.tasks = tasks if tasks is not None else build_tasks(cfg)
        o = cfg.optim
        self.plan = StagePlan(
            cfg.stages,
            sampling_weights(self.tasks),
            cfg.train.steps,
            o.warmup_steps,
            o.min_lr_ratio,
            o.decay_steps if o.schedule == "step" else None,
            o.decay_factor,
        )
        self.total_steps = self.plan.total
        self.sampler = self._sampler()
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = build_model(cfg, self.tasks).to(device)
        self.init_reports: list[LoadReport] = self._initialise() if initialise and self.rank == 0 else []
        self._broadcast_state()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.plan.lr_multiplier)
        amp_on = cfg.train.amp and device.type == "cuda"
        self.autocast = autocast_for(cfg.train, device)
        self.scaler = torch.amp.GradScaler("cuda") if amp_on and cfg.train.amp_dtype == "float16" else None
        # Heads with state every rank must update alike (MoCo: queue of keys, momentum encoder).
        self.synced = {n: h for n, h in self.model.heads.items() if claims(h, SyncsAcrossRanks)}
        self.attached = attached_tasks(self.tasks)
        self.payload = self._payload()
        self.streams: dict[str, TaskStream] = {}
        self.step = 0
        self.start_step = 0
        self.initial_eval: dict[str, dict[str, float]] = {}
        self.report = PendingReport()
        self.hooks = list(hooks)
        self.stage_index = -1
        self.enter_stage(self.plan.index_at(0))

    # -- setup --------------------------------------------------------------------------------
    def _sampler(self) -> TaskSampler:
        name = self.cfg.train.sampler
        # Listing a train split can be slow (a directory walk): only the samplers that need sizes do.
        sizes = [train_size(t) for t in self.tasks] if name in NEEDS_SIZES else None
        batch_sizes = [t.cfg.batch_size for t in self.tasks]
        return TaskSampler(name, self.plan, self.cfg.train.seed, sizes, batch_sizes)

    def _initialise(self) -> list[LoadReport]:
        """Weights only, from `model.init_from` and/or `backbone.init_from` (rank 0; broadcast)."""
        reports = []
        if self.cfg.model.init_from:
            state, kind = read_weights(self.cfg.model.init_from)
            if kind != "checkpoint":
                raise ValueError(
                    f"model.init_from={self.cfg.model.init_from}: a plain state_dict holds a backbone only; "
                    "use backbone.init_from for it"
                )
            m = self.cfg.model
            reports.append(load_weights(self.model, state, m.init_from, m.init_map, m.init_skip))
        if self.cfg.backbone.init_from:
            reports.append(load_backbone(self.model.backbone, self.cfg.backbone.init_from))
        return reports

    def _broadcast_state(self) -> None:
        if self.world > 1:
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                dist.broadcast(t.data, src=0)

    def _payload(self) -> StepPayload:
        p, n = StepPayload(), len(self.tasks)
        p.register("nonfinite", n)  # 1 where a rank's loss was NaN/inf
        p.register("loss", n)  # loss sums per task
        p.register("steps", n)  # how many workers ran each task
        p.register("samples", n)
        p.register("data_wait", self.world)  # seconds each rank waited for its batch
        p.register("task_choice", self.world, windowed=False)  # the task index each rank ran
        # Rank 0: how many finished asynchronous evaluations every rank reports after this step
        p.register("rank0_reports", 1, windowed=False)
        for name, head in self.synced.items():  # e.g. MoCo's keys, for a queue shared by all ranks
            for slot, size in head.sync_slots().items():
                p.register(f"{name}/{slot}", size * self.world, windowed=False)
        return p

    def enter_stage(self, index: int) -> None:
        """Make stage `index` current: its frozen parameters lose requires_grad and optimizer state,
        the BN and dropout layers of all-frozen modules go to eval mode (gppf.engine.stages.frozen_modules),
        and the masked allreduce covers only what trains."""
        stage = self.plan.stages[index]
        where = f"stages[{index}] ({stage.name})"
        frozen = frozen_parameters(self.model, stage.freeze, where, stage.train_only)
        can_train = {id(p) for p in self.trainable}
        for name, p in self.model.named_parameters():
            p.requires_grad_(name not in frozen and id(p) in can_train)
        for p in self.model.parameters():
            if not p.requires_grad:
                self.optimizer.state.pop(p, None)
        training = [p for p in self.model.parameters() if p.requires_grad]
        if not training:
            raise ValueError(f"stages[{index}] ({stage.name}) freezes every parameter: nothing would train")
        if self.reducer is not None:
            self.reducer.close()
        self.reducer = MaskedAllReduce(
            training, self.cfg.train.bucket_mb, self.grad_group, overlap=self.overlap
        )
        self.frozen = frozen_modules(self.model, frozen)
        check_task_options(stage, {t.name: t for t in self.tasks}, where)
        for task in self.tasks:
            task.enter_stage(self.model.heads[task.name], stage.task_options.get(task.name, {}), where)
        self.stage_index = index
        self.set_train_mode()

    def set_train_mode(self) -> None:
        """Training mode, except the frozen BN / dropout layers of the current stage (eval: BN
        statistics and dropout stay put). Called on stage entry and after evaluation, never per step."""
        self.model.train()
        for m in self.frozen:
            m.eval()

    def stream(self, task: Task) -> TaskStream:
        if task.name not in self.streams:
            self.streams[task.name] = TaskStream(
                task, self.cfg.train.seed, self.rank, self.world, self.cfg.data
            )
        return self.streams[task.name]

    def task_at(self, step: int) -> int:
        return self.sampler.task_at(step, self.rank, self.world)

    def step_state(self) -> StepState:
        tau_step, tau_total = self.plan.tau_clock(self.step)
        return StepState(self.cfg.train.seed, self.step, self.rank, tau_step, tau_total)

    # -- the step -----------------------------------------------------------------------------
    def train_step(self) -> StepOutput:
        """One SIMT step. Returns this step's payload summed over all workers."""
        t0 = time.perf_counter()
        ti = self.task_at(self.step)
        parts = [ti, *self.attached.get(ti, [])]  # the sampled task, then auxiliary tasks it carries
        batches, wait = [], 0.0
        for i in parts:
            batch, waited = self.stream(self.tasks[i]).next()
            batches.append(self.tasks[i].to_device(batch, self.device))
            wait += waited
        rng = step_rng(self.cfg.train.seed, self.step, self.rank)  # resumed runs repeat every draw
        batches = [self.tasks[i].train_batch(b, rng) for i, b in zip(parts, batches)]
        self.model.backbone.set_step(self.step_state())
        with self.autocast():
            outs, tie = self.forward(parts, batches)
            losses = self.losses(parts, outs, batches)
        loss = sum(losses) + tie
        self._record(parts, losses, batches, wait)
        extra = self.payload.build(self.device)  # the payload rides along in the last bucket
        if self.scaler:
            loss = self.scaler.scale(loss)
        if self.overlap:  # buckets go out during backward
            self.reducer.start(loss, extra)
            loss.backward()
            summed, _ = self.reducer.finish()
        else:
            loss.backward()
            summed, _ = self.reducer.reduce(extra)
        stats = self.reducer.host_extra  # the step's one device-to-host copy (gppf.dist.allreduce)
        self._raise_if_nonfinite(stats)
        self._sync_heads(summed)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # None = "unused" for the next masked allreduce
        self.scheduler.step()
        for head in self.synced.values():
            head.momentum_update()
        self.call("after_optimizer_step")
        self.step += 1
        return StepOutput(ti, stats, wait, time.perf_counter() - t0)

    def forward(self, parts: list[int], batches: list[dict[str, torch.Tensor]]) -> tuple[list, torch.Tensor]:
        """Head outputs of each part and the BN tie (gppf.engine.step.forward_parts)."""
        return forward_parts(self.model, [self.tasks[i] for i in parts], batches)

    def losses(self, parts: list[int], outs: list, batches: list[dict]) -> list[torch.Tensor]:
        return weighted_losses([self.tasks[i] for i in parts], outs, batches)

    def _record(self, parts: list[int], losses: list[torch.Tensor], batches: list[dict], wait: float) -> None:
        p = self.payload
        for i, loss, batch in zip(parts, losses, batches):
            loss = loss.detach().float()
            finite = torch.isfinite(loss)  # a tensor: no host sync before backward
            p.add("nonfinite", i, (~finite).float())
            p.add("loss", i, torch.where(finite, loss, torch.zeros_like(loss)))
            p.add("steps", i, 1.0)
            p.add("samples", i, batch[self.tasks[i].input_key()].shape[0])
            head = self.synced.get(self.tasks[i].name)
            if head is not None:
                for slot, values in head.sync_put().items():
                    p.put(f"{self.tasks[i].name}/{slot}", self.rank * values.numel(), values)
        p.add("data_wait", self.rank, wait)
        p.add("task_choice", self.rank, parts[0])

    def _sync_heads(self, summed: torch.Tensor) -> None:
        """Every rank, every step: heads with cross-rank state (MoCo's queue) read what every rank
        put into their payload slots."""
        for name, head in self.synced.items():
            head.sync_get({slot: self.payload.view(summed, f"{name}/{slot}") for slot in head.sync_slots()})

    def _raise_if_nonfinite(self, stats: torch.Tensor) -> None:
        bad = self.payload.view(stats, "nonfinite").numpy()  # on the host already: no device read
        if bad.sum() > 0:  # every rank sees the sum, so every rank raises: none waits in a collective
            names = [self.tasks[i].name for i in range(len(self.tasks)) if bad[i] > 0]
            raise NonFiniteLossError(f"non-finite loss in task(s) {', '.join(names)} at step {self.step}")

    # -- the loop -----------------------------------------------------------------------------
    def call(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def run(self) -> None:
        """Train from the current step to the end of the plan. Hooks that issue collectives run on
        every rank at the same steps (the trainer calls them alike everywhere)."""
        self.start_step = self.step
        try:
            self.call("before_train")
            while self.step < self.total_steps:
                self.call("before_step")
                out = self.train_step()
                self.call("after_step", out)
            self.call("after_train")
        finally:
            self.close()
            for hook in self.hooks:
                hook.close()

    # -- evaluation and state -----------------------------------------------------------------
    def evaluate(self, max_batches: int = 0, names: list[str] | None = None) -> dict[str, dict[str, float]]:
        """Every worker evaluates its share of each task's validation split (of the tasks `names`,
        default all); states are summed."""
        model, data = self.model, self.cfg.data
        tasks = [t for t in self.tasks if names is None or t.name in names]
        results = evaluate(model, tasks, data, self.device, self.rank, self.world, max_batches, self.autocast)
        self.set_train_mode()
        return results

    def state_dict(self) -> dict[str, Any]:
        """The whole training state (a collective: it gathers every rank's stream positions)."""
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
            "initial_eval": self.initial_eval,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.initial_eval = state.get("initial_eval") or {}
        self.enter_stage(self.plan.index_at(self.step))  # the stage is a function of the step
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
