"""P1–P3 benchmarks of the SIMT spine. Ratios are measured inside one run (these machines are noisy).

    python benchmarks/simt_bench.py p1 [--backbone resnet18 --batch 16 --size 64 --steps 30]
    python benchmarks/simt_bench.py p2 [--backbone resnet50 --repeats 20]
    python benchmarks/simt_bench.py p3 runs/<demo run directory>

P1: the platform's SIMT step (Trainer.train_step: task sampling, cross-task BN, masked allreduce,
    optimizer) against a hand-written torch.distributed loop doing the same single-task work:
    the same model and batch on 2 gloo workers, (a) DDP with local BN -- what one would write by
    hand -- and (b) the same loop with the platform's cross-task BN, so (b) isolates the trainer.
    Both read a fixed in-memory batch, so data loading (P3) is not part of it.
P2: MaskedAllReduce.reduce() against DDP-style bucketed allreduce of the same gradients (25 MB
    buckets: flatten, all_reduce, divide, copy back), 2 gloo workers, and against the
    communication share of a real DDP step (step time with sync minus with no_sync()).
P3: the fraction of step time the demo run's workers waited for data, from its metrics.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path


def _median_time(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _FixedStream:
    """Stands in for a TaskStream: the same in-memory batch every step, no waiting."""

    def __init__(self, batch):
        self.batch = batch

    def next(self):
        return self.batch, 0.0


def _p1_rank(rank: int, world: int, backbone: str, batch: int, size: int, steps: int) -> dict:
    import torch
    import torch.distributed as dist
    from torch import nn

    from gppf.api.registry import build_tasks
    from gppf.config.job import BackboneConfig, JobConfig, OptimConfig, TrainConfig
    from gppf.engine.trainer import Trainer
    from gppf.models.backbone import Backbone
    from gppf.models.model import MultiTaskModel

    cfg = JobConfig(
        tasks={
            "cls": {"type": "classification", "data_root": "/unused", "num_classes": 10, "batch_size": batch}
        },
        backbone=BackboneConfig(name=backbone),
        optim=OptimConfig(lr=0.01, warmup_steps=0),
        train=TrainConfig(steps=10_000),
    )
    tasks = build_tasks(cfg)
    g = torch.Generator().manual_seed(rank)
    data = {
        "image": torch.randn(batch, 3, size, size, generator=g),
        "label": torch.randint(0, 10, (batch,), generator=g),
    }
    w = Trainer(cfg, torch.device("cpu"), tasks)
    w.streams["cls"] = _FixedStream(data)
    # The platform's default on CPU sends the gradients after backward; "on" overlaps them.
    w_overlap = Trainer(
        dataclasses.replace(cfg, train=TrainConfig(steps=10_000, overlap_allreduce="on")),
        torch.device("cpu"),
        tasks,
    )
    w_overlap.streams["cls"] = _FixedStream(data)

    def hand_loop(cross_bn: bool):
        torch.manual_seed(0)
        model = MultiTaskModel(Backbone(backbone, cross_task_bn=cross_bn), tasks)
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        loss_fn = nn.CrossEntropyLoss()

        def step():
            out, tie = ddp(data["image"], "cls")
            (loss_fn(out, data["label"]) + tie).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    # Interleave the three so that drifts of a noisy machine hit them alike.
    fns = {
        "platform": w.train_step,
        "platform_overlap": w_overlap.train_step,
        "ddp_local_bn": hand_loop(False),
        "ddp_cross_bn": hand_loop(True),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(steps + 3):
        for k, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if i >= 3:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _p2_rank(rank: int, world: int, backbone: str, repeats: int) -> dict:
    import torch
    import torch.distributed as dist
    from torch import nn

    from gppf.dist.allreduce import MaskedAllReduce, make_buckets
    from gppf.models.backbone import Backbone

    torch.manual_seed(0)
    model = nn.Sequential(Backbone(backbone, cross_task_bn=False))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) for p in params]

    def set_grads():
        for p, gr in zip(params, grads):
            p.grad = gr.clone()

    reducer = MaskedAllReduce(params)

    def masked():
        set_grads()
        reducer.reduce(torch.zeros(9))

    buckets = make_buckets(params)

    def ddp_style():
        set_grads()
        for b in buckets:
            flat = torch.cat([p.grad.reshape(-1) for p in b.params])
            dist.all_reduce(flat)
            flat.div_(world)
            off = 0
            for p in b.params:
                p.grad.copy_(flat[off : off + p.numel()].view_as(p))
                off += p.numel()

    t_masked = _median_time(masked, repeats)
    t_ddp_style = _median_time(ddp_style, repeats)

    # What each exchange adds to a real forward + backward, the steps interleaved (a noisy machine
    # drifts alike for all) with one compute thread per worker, as the trainer sets it: the
    # masked allreduce overlapped with backward (the trainer's default) and after it, and DDP's
    # (with sync - under no_sync()), each minus the same step with no exchange.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    x = torch.randn(2, 3, 64, 64)
    overlapped = MaskedAllReduce(params, overlap=True)
    ddp = nn.parallel.DistributedDataParallel(model)

    def step(mode: str) -> None:
        with ddp.no_sync() if mode == "ddp_no_sync" else contextlib.nullcontext():
            loss = sum(f.mean() for f in (ddp if mode.startswith("ddp") else model)(x))
            if mode == "overlap":
                overlapped.start(loss, torch.zeros(9))
            loss.backward()
            if mode == "overlap":
                overlapped.finish()
            elif mode == "after":
                reducer.reduce(torch.zeros(9))
        model.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {m: [] for m in ("none", "overlap", "after", "ddp", "ddp_no_sync")}
    for i in range(repeats + 3):
        for mode in times:
            dist.barrier()
            t0 = time.perf_counter()
            step(mode)
            if i >= 3:
                times[mode].append(time.perf_counter() - t0)
    t = {m: statistics.median(v) for m, v in times.items()}
    overlapped.close()
    dist.barrier()
    return {
        "masked": t_masked,
        "ddp_style": t_ddp_style,
        "ddp_comm": t["ddp"] - t["ddp_no_sync"],
        "step_overlap": t["overlap"] - t["none"],
        "step_after": t["after"] - t["none"],
        "numel": sum(p.numel() for p in params),
    }


def p1(args) -> None:
    from gppf.dist.local_dist import run_distributed

    res = run_distributed(_p1_rank, 2, args.backbone, args.batch, args.size, args.steps, timeout=1800)
    r = {k: max(x[k] for x in res) for k in res[0]}
    print(f"P1 ({args.backbone}, batch {args.batch}, {args.size}px, 2 gloo workers, median of {args.steps})")
    for key, label in (
        ("ddp_cross_bn", "hand-written DDP, cross BN"),
        ("ddp_local_bn", "hand-written DDP, local BN"),
    ):
        print(f"  {label:<38} {r[key] * 1000:8.1f} ms")
    for key, label in (
        ("platform", "platform SIMT step (CPU default: after)"),
        ("platform_overlap", "platform, allreduce overlapped"),
    ):
        cross, local = r[key] / r["ddp_cross_bn"], r[key] / r["ddp_local_bn"]
        print(f"  {label:<38} {r[key] * 1000:8.1f} ms  P1 {cross:.3f}  P1' {local:.3f}")


def p2(args) -> None:
    from gppf.dist.local_dist import run_distributed

    res = run_distributed(_p2_rank, 2, args.backbone, args.repeats, timeout=1800)
    r = {k: max(x[k] for x in res) for k in res[0]}
    print(f"P2 ({args.backbone}, {r['numel'] / 1e6:.1f} M params, 2 gloo workers, median of {args.repeats})")
    print(f"  masked allreduce              {r['masked'] * 1000:8.1f} ms  (gradients given, after backward)")
    for key, label in (
        ("ddp_style", "DDP-style bucketed allreduce"),
        ("ddp_comm", "DDP step, sync - no_sync  "),
    ):
        ratio = r["masked"] / max(r[key], 1e-9)
        print(f"  {label}  {r[key] * 1000:8.1f} ms  ratio {ratio:.3f}")
    # P2': what each exchange adds to a real backward, against what DDP's adds to its own.
    for key, label in (("step_after", "after backward"), ("step_overlap", "overlapped    ")):
        ratio = r[key] / max(r["ddp_comm"], 1e-9)
        print(f"  step cost, masked {label}  {r[key] * 1000:8.1f} ms  ratio to DDP's {ratio:.3f}")


def p3(args) -> None:
    lines = [json.loads(line) for line in Path(args.run, "metrics.jsonl").read_text().splitlines()]
    lines = [m for m in lines if "data_wait_fraction" in m]  # training windows (not the step-0 eval)
    fr = [m["data_wait_fraction"] for m in lines]
    steady = fr[1:] if len(fr) > 1 else fr
    print(f"P3 ({args.run}, {len(fr)} windows of {lines[0]['step']} steps)")
    print(f"  data wait, whole run          {100 * statistics.mean(fr):6.2f} % of step time")
    print(f"  data wait, after window 1     {100 * statistics.mean(steady):6.2f} %")
    print(f"  worst window                  {100 * max(fr):6.2f} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("p1")
    a.add_argument("--backbone", default="resnet18")
    a.add_argument("--batch", type=int, default=16)
    a.add_argument("--size", type=int, default=64)
    a.add_argument("--steps", type=int, default=30)
    b = sub.add_parser("p2")
    b.add_argument("--backbone", default="resnet50")
    b.add_argument("--repeats", type=int, default=20)
    c = sub.add_parser("p3")
    c.add_argument("run")
    args = ap.parse_args()
    {"p1": p1, "p2": p2, "p3": p3}[args.cmd](args)


if __name__ == "__main__":
    main()
