"""One GPU check (issue 25, item 8): the platform's own step (`Trainer.train_step` on in-memory
batches) measured five ways, in one process.

    python -m benchmarks.gpu_check [--device auto|cuda|cpu] [--json PATH]

(a) AMP: the same model and batches, the loss of N steps in fp32 against `train.amp` with
    `train.amp_dtype` bfloat16 and float16 (float16 with the trainer's GradScaler); the maximum
    relative difference of the per-step losses (step 0 has identical weights; later steps
    also carry the drift of the updates). The fp32 reference runs with TF32 off.
(b) P5: images/s of a SIMT config (several tasks) against a single-task config, the same model
    and batch size, steps interleaved. One process is one rank: under SIMT it alternates
    tasks from step to step, which is what each GPU of a SIMT job does.
(c) P4: memory of one step of lego trunks (N units, hard and soft routes, with and without
    gradient checkpointing) and the static trunk: `torch.cuda.max_memory_allocated` above
    what was allocated before the step, and everywhere the bytes autograd saves for backward
    (unique storages, parameters excluded: the figure memory_bench.py and the planner give).
(d) Host syncs: the operations of one step that wait for the device, counted by
    gppf.tools.host_syncs.HostSyncs (the counter of tests/test_host_syncs.py), and on CUDA the
    warnings of `torch.cuda.set_sync_debug_mode("warn")`.
(e) torch.compile: the model compiled (`nn.Module.compile`, the trainer's step around it
    unchanged; 2 tasks, each compiles its own graph), its losses against eager on the same
    steps, graph breaks, and step time against eager.

On a GPU it uses ResNet-50 at 224 px, batch 32, a lego trunk with 2 units. Without one it runs
the same code shrunk (ResNet-10t, 32 px, batch 4, a few steps, torch.compile with the
`aot_eager` backend: inductor's C++ build of a forward and backward takes minutes on 2 cores)
and says so: those figures are not GPU figures. Each section that fails prints its error and
the others still run; the exit status is 1 then.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gppf.config.job import BackboneConfig, JobConfig, LegoConfig, OptimConfig, TrainConfig
from gppf.engine.trainer import Trainer
from gppf.tools.host_syncs import HostSyncs

CPU_NOTICE = "no GPU: ran shrunk on CPU; figures are not GPU figures"


@dataclass
class Sizes:
    backbone: str
    image: int  # px
    batch: int  # per step (one rank)
    tasks: int  # SIMT tasks in (a), (b) and (e)
    units: int  # lego units per layer
    amp_steps: int
    warmup: int  # untimed steps before timing
    timed: int  # timed steps per variant
    compile_backend: str


GPU_SIZES = Sizes(
    "resnet50", 224, 32, tasks=4, units=2, amp_steps=20, warmup=5, timed=30, compile_backend="inductor"
)
CPU_SIZES = Sizes(
    "resnet10t", 32, 4, tasks=2, units=2, amp_steps=3, warmup=1, timed=3, compile_backend="aot_eager"
)


class FixedStream:
    """Stands in for a TaskStream: one in-memory batch (already on the device), every step."""

    def __init__(self, batch):
        self.batch = batch

    def next(self):
        return self.batch, 0.0

    def close(self):
        pass


def job(
    s: Sizes, tasks: int, kind: str = "static", mode: str = "soft", ckpt: bool = False, **train
) -> JobConfig:
    cls = {"type": "classification", "data_root": "/unused", "batch_size": s.batch}
    names = {f"t{i}": {**cls, "num_classes": 10 + i} for i in range(tasks)}  # heads of different shapes
    lego = LegoConfig(num_units=s.units, mode=mode, tau_start=1.0)
    return JobConfig(
        tasks=names,
        backbone=BackboneConfig(name=s.backbone, kind=kind, lego=lego, grad_checkpointing=ckpt),
        optim=OptimConfig(lr=0.01, warmup_steps=0),
        train=TrainConfig(steps=10_000, **train),
    )


def trainer(cfg: JobConfig, s: Sizes, device: torch.device) -> Trainer:
    t = Trainer(cfg, device)
    g = torch.Generator().manual_seed(0)  # the same batches for every trainer of a section
    for task in t.tasks:
        image = torch.randn(s.batch, 3, s.image, s.image, generator=g)
        label = torch.randint(0, task.cfg.num_classes, (s.batch,), generator=g)
        t.streams[task.name] = FixedStream({"image": image.to(device), "label": label.to(device)})
    return t


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_loss(t: Trainer) -> float:
    out = t.train_step()
    return float(t.payload.view(out.stats, "loss").sum())  # one rank: its task's loss


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# -- (a) AMP ------------------------------------------------------------------------------------
def amp_agreement(s: Sizes, device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": s.amp_steps}
    if device.type == "cpu":
        out["note"] = (
            "the trainer ignores train.amp on CPU (gppf.engine.step.autocast_for); this check puts "
            "torch.autocast('cpu') and, for float16, GradScaler('cpu') into the trainer itself"
        )
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    losses: dict[str, list[float]] = {}
    for name, amp, dtype in (
        ("fp32", False, "bfloat16"),
        ("bf16", True, "bfloat16"),
        ("fp16", True, "float16"),
    ):
        if name == "fp32":  # the reference in true float32 (cuDNN convolutions default to TF32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            t = trainer(job(s, s.tasks, amp=amp, amp_dtype=dtype), s, device)
            if amp and device.type == "cpu":
                torch_dtype = getattr(torch, dtype)
                t.autocast = lambda d=torch_dtype: torch.autocast("cpu", dtype=d)
                t.scaler = torch.amp.GradScaler("cpu") if dtype == "float16" else None
            init_scale = float(t.scaler.get_scale()) if t.scaler is not None else 0.0
            with warnings.catch_warnings():  # a step the scaler skips (inf/NaN gradients) warns here
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                losses[name] = [step_loss(t) for _ in range(s.amp_steps)]
            if t.scaler is not None:  # it halves its scale at each skipped step (no growth before 2000)
                scale = float(t.scaler.get_scale())
                out[f"{name}_final_scale"] = scale
                out[f"{name}_skipped_steps"] = round(math.log2(init_scale / scale))
        except Exception as e:  # noqa: BLE001 - reported, the other precisions still run
            out[f"{name}_error"] = f"{type(e).__name__}: {e}"
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            t = None
            release(device)
    out["losses"] = losses
    ref = losses.get("fp32")
    for name in ("bf16", "fp16"):
        if ref and name in losses:
            diffs = [rel(a, b) for a, b in zip(losses[name], ref)]
            out[name] = {
                "step0_rel_diff": diffs[0],
                "max_rel_diff": max(diffs),
                "finite": all(map(math.isfinite, losses[name])),
            }
    return out


# -- (b) P5: SIMT vs a single task --------------------------------------------------------------
def interleaved(trainers: dict[str, Trainer], s: Sizes, device: torch.device) -> dict[str, float]:
    """Median seconds per step of each trainer, their steps interleaved (drifts hit all alike)."""
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for i in range(s.warmup + s.timed):
        for k, t in trainers.items():
            sync(device)
            t0 = time.perf_counter()
            t.train_step()
            sync(device)
            if i >= s.warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def simt_vs_single(s: Sizes, device: torch.device) -> dict[str, Any]:
    trainers = {"single": trainer(job(s, 1), s, device), "simt": trainer(job(s, s.tasks), s, device)}
    sec = interleaved(trainers, s, device)
    simt = trainers["simt"]
    ran = {simt.task_at(i) for i in range(simt.step)}
    trainers = None
    release(device)
    ips = {k: s.batch / v for k, v in sec.items()}
    return {
        "tasks": s.tasks,
        "simt_tasks_run": len(ran),
        "step_ms": {k: 1000 * v for k, v in sec.items()},
        "images_per_s": ips,
        "simt_over_single": ips["simt"] / ips["single"],
        "note": "one rank: under SIMT it alternates tasks step by step",
    }


# -- (c) P4: memory of lego trunks --------------------------------------------------------------
P4_VARIANTS = ("static", "hard", "soft", "hard+ckpt", "soft+ckpt")


def step_memory(t: Trainer, device: torch.device) -> dict[str, float]:
    """One step after a first (which allocates gradients' buffers and optimizer state)."""
    t.train_step()
    params = {p.untyped_storage().data_ptr() for p in t.model.parameters()}
    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        ptr = x.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = x.untyped_storage().nbytes()
        return x

    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        t.train_step()
    sync(device)
    out = {"saved_mb": sum(saved.values()) / 2**20}
    if device.type == "cuda":
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        out["peak_total_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def lego_memory(s: Sizes, device: torch.device) -> dict[str, Any]:
    rows = {}
    for variant in P4_VARIANTS:
        mode, _, ckpt = variant.partition("+")
        kind = "static" if mode == "static" else "lego"
        t = trainer(
            job(s, s.tasks, kind=kind, mode="soft" if kind == "static" else mode, ckpt=bool(ckpt)), s, device
        )
        rows[variant] = step_memory(t, device)
        t = None
        release(device)
    key = "peak_mb" if device.type == "cuda" else "saved_mb"
    return {
        "measured": "torch.cuda.max_memory_allocated above the step's start"
        if device.type == "cuda"
        else "bytes saved for backward (no CUDA allocator on CPU)",
        "rows": rows,
        "ratio_to_static": {k: v[key] / rows["static"][key] for k, v in rows.items()},
    }


# -- (d) host syncs -----------------------------------------------------------------------------
SYNC_TRUNKS = (("static", "soft"), ("lego", "soft"), ("lego", "hard"))


def host_syncs(s: Sizes, device: torch.device) -> dict[str, Any]:
    rows = {}
    for kind, mode in SYNC_TRUNKS:
        t = trainer(job(s, s.tasks, kind=kind, mode=mode), s, device)
        t.train_step()  # the first step builds lazy state
        with HostSyncs() as counter:
            t.train_step()
        row: dict[str, Any] = {"events": counter.events, "count": len(counter.events)}
        if device.type == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    t.train_step()
                    sync(device)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            hits = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
            row["cuda_sync_warnings"] = len(hits)
            row["cuda_sync_first"] = hits[0].splitlines()[0] if hits else ""
        rows[f"{kind}/{mode}"] = row
        t = None
        release(device)
    return {"rows": rows}


# -- (e) torch.compile --------------------------------------------------------------------------
def compiled_step(s: Sizes, device: torch.device, backend: str) -> dict[str, Any]:
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    tasks = min(s.tasks, 2)  # each task compiles its own graph (its name is a constant of it)
    eager = trainer(job(s, tasks), s, device)
    comp = trainer(job(s, tasks), s, device)
    comp.model.compile(backend=backend)
    out: dict[str, Any] = {"backend": backend, "tasks": tasks}
    # Warm-up: the same steps on both (the same task draws and batches), so the losses must agree;
    # long enough that every task was drawn, so that the timed steps compile nothing.
    n = max(s.warmup, tasks)
    while len({comp.task_at(i) for i in range(n)}) < tasks and n < 50 * tasks:
        n += 1
    out["warmup_steps"] = n
    sync(device)
    t0 = time.perf_counter()
    compiled_losses = [step_loss(comp) for _ in range(n)]
    sync(device)
    out["warmup_s"] = time.perf_counter() - t0
    eager_losses = [step_loss(eager) for _ in range(n)]
    out["max_rel_diff_vs_eager"] = max(rel(a, b) for a, b in zip(compiled_losses, eager_losses))
    breaks = torch._dynamo.utils.counters["graph_break"]
    out["graph_breaks"] = sum(breaks.values())
    out["graph_break_reasons"] = [str(k).splitlines()[0][:160] for k in list(breaks)[:5]]
    sec = interleaved({"eager": eager, "compiled": comp}, Sizes(**{**asdict(s), "warmup": 0}), device)
    out["step_ms"] = {k: 1000 * v for k, v in sec.items()}
    out["compiled_over_eager"] = sec["compiled"] / sec["eager"]
    out["ok"] = all(math.isfinite(x) for x in compiled_losses)
    eager = comp = None
    torch._dynamo.reset()
    release(device)
    return out


# -- the report ---------------------------------------------------------------------------------
def _print_amp(r: dict[str, Any]) -> None:
    print(f"[amp] loss over {r['steps']} steps, relative to fp32 (TF32 off)")
    for k in ("bf16", "fp16"):
        if k not in r:
            why = r.get(f"{k}_error") or f"fp32 reference failed: {r.get('fp32_error', '')}"
            print(f"  {k}: FAILED: {why}")
            continue
        v = r[k]
        line = f"  {k}: step 0 {v['step0_rel_diff']:.2e}  max {v['max_rel_diff']:.2e}  finite {v['finite']}"
        if f"{k}_final_scale" in r:
            line += f"  loss scale {r[k + '_final_scale']:g} ({r[k + '_skipped_steps']} steps skipped)"
        print(line)
    if "note" in r:
        print(f"  note: {r['note']}")


def _print_p5(r: dict[str, Any]) -> None:
    ms, ips = r["step_ms"], r["images_per_s"]
    print(f"[p5] SIMT ({r['tasks']} tasks, {r['simt_tasks_run']} drawn) vs single task, {r['note']}")
    for k in ("single", "simt"):
        print(f"  {k:<7} {ms[k]:9.1f} ms/step  {ips[k]:9.1f} images/s")
    print(f"  SIMT / single images/s: {r['simt_over_single']:.3f}")


def _print_p4(r: dict[str, Any]) -> None:
    print(f"[p4] one step's memory: {r['measured']}")
    for k, v in r["rows"].items():
        peak = f"  peak {v['peak_mb']:9.1f} MB" if "peak_mb" in v else ""
        ratio = r["ratio_to_static"][k]
        print(f"  {k:<10}{peak}  saved for backward {v['saved_mb']:9.1f} MB  x{ratio:.2f} of static")


def _print_syncs(r: dict[str, Any]) -> None:
    print("[syncs] device-to-host synchronisations in one train_step")
    for k, v in r["rows"].items():
        line = f"  {k:<12} counted {v['count']} {v['events']}"
        if "cuda_sync_warnings" in v:
            line += f"  set_sync_debug_mode warnings {v['cuda_sync_warnings']} {v['cuda_sync_first']}"
        print(line)


def _print_compile(r: dict[str, Any]) -> None:
    status = "worked" if r["ok"] else "ran, non-finite loss"
    ms = r["step_ms"]
    print(f"[compile] torch.compile (backend {r['backend']}) of the model in train_step: {status}")
    print(f"  {r['tasks']} tasks, {r['warmup_steps']} warm-up steps compared with eager")
    print(
        f"  warm-up (compiles) {r['warmup_s']:.1f} s, its losses vs eager max rel diff "
        f"{r['max_rel_diff_vs_eager']:.2e}, graph breaks {r['graph_breaks']}"
    )
    for reason in r["graph_break_reasons"]:
        print(f"    break: {reason}")
    print(
        f"  eager {ms['eager']:.1f} ms/step, compiled {ms['compiled']:.1f} ms/step, "
        f"compiled / eager {r['compiled_over_eager']:.3f}"
    )


PRINT = {
    "amp": _print_amp,
    "p5": _print_p5,
    "p4": _print_p4,
    "syncs": _print_syncs,
    "compile": _print_compile,
}


def _print_section(name: str, r: dict[str, Any]) -> None:
    if "error" in r:
        lines = r["error"].splitlines() or [""]
        more = f" (+{len(lines) - 1} lines in --json)" if len(lines) > 1 else ""
        print(f"[{name}] FAILED: {lines[0][:300]}{more}")
    else:
        PRINT[name](r)


SECTIONS = (("amp", amp_agreement), ("p5", simt_vs_single), ("p4", lego_memory), ("syncs", host_syncs))


def run(device_arg: str = "auto", compile_backend: str = "") -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    if device_arg == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device here")
    device = torch.device("cuda" if device_arg in ("auto", "cuda") and cuda else "cpu")
    s = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    if compile_backend:
        s = Sizes(**{**asdict(s), "compile_backend": compile_backend})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shrunk = device.type == "cpu"
    if shrunk:
        print(CPU_NOTICE)
    print(f"gpu_check on {name}, torch {torch.__version__}: {s.backbone}, {s.image} px, batch {s.batch}")
    results: dict[str, Any] = {
        "device": name,
        "shrunk": shrunk,
        "torch": torch.__version__,
        "sizes": asdict(s),
    }
    sections = (*SECTIONS, ("compile", lambda s, d: compiled_step(s, d, s.compile_backend)))
    for key, fn in sections:
        try:
            results[key] = fn(s, device)
        except Exception as e:  # noqa: BLE001 - a failed section is reported; the others still run
            results[key] = {"error": f"{type(e).__name__}: {e}"}
        _print_section(key, results[key])
    if shrunk:
        print(CPU_NOTICE)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--compile-backend", default="", help="default: inductor on CUDA, aot_eager on CPU")
    ap.add_argument("--json", default="", help="write every figure to this file")
    args = ap.parse_args(argv)
    results = run(args.device, args.compile_backend)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if any("error" in v for v in results.values() if isinstance(v, dict)) else 0


if __name__ == "__main__":
    raise SystemExit(main())
