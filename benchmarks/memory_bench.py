"""P4: peak memory of one training step, static vs hard- vs soft-routed lego ResNet (N units),
each without and with gradient checkpointing (`+ckpt`: static per stage, lego per lego layer).

    python benchmarks/memory_bench.py [--backbone resnet50 --batch 8 --size 224 --units 2]

Each variant runs in a fresh process: build the model, run one step (forward, backward, SGD),
and report the step's peak memory above what the process held before the step (parameters,
gradients and optimizer state excluded). On CPU that is the highest resident set sampled every
0.5 ms during the step minus the resident set just before it (after malloc_trim); with
--device cuda it is torch.cuda.max_memory_allocated above the allocation before the step, with
bf16 autocast. "saved for backward" adds up the unique tensors autograd keeps from forward to
backward (parameters excluded): exact and repeatable, unlike the resident-set figure on CPU.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import threading
import time


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _one(variant: str, backbone: str, batch: int, size: int, units: int, device: str) -> dict:
    import torch

    from gppf.config.job import LegoConfig
    from gppf.dist.cross_bn import CrossTaskBatchNorm2d
    from gppf.models.backbone import Backbone
    from gppf.models.lego import LegoResNet

    torch.manual_seed(0)
    kind, _, ckpt = variant.partition("+")
    if kind == "static":
        model = Backbone(backbone, grad_checkpointing=bool(ckpt))
    else:
        model = LegoResNet(backbone, ["t"], LegoConfig(num_units=units, mode=kind))
        CrossTaskBatchNorm2d.convert(model)
        model.set_grad_checkpointing(bool(ckpt))
        model.tau = 1.0
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)

    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):  # activations kept for backward: unique storages, parameters excluded
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    def step():
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = sum(f.float().mean() for f in model(x, "t"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep grads allocated: the step's own peak is measured

    step()  # allocate grads and momentum first
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so RSS is what is in use
        base = _rss()
        peak_rss = [base]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak_rss[0] = max(peak_rss[0], _rss())
                time.sleep(0.0005)

        t = threading.Thread(target=sample)
        t.start()
        step()
        done.set()
        t.join()
        peak = peak_rss[0] - base
    params = sum(p.numel() for p in model.parameters())
    return {
        "variant": variant,
        "peak_mb": peak / 2**20,
        "saved_mb": sum(saved.values()) / 2**20,
        "params_m": params / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--units", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(_one(args.variant, args.backbone, args.batch, args.size, args.units, args.device)))
        return
    rows = []
    for variant in ("static", "hard", "soft", "static+ckpt", "hard+ckpt", "soft+ckpt"):
        cmd = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    static, static_saved = rows[0]["peak_mb"], rows[0]["saved_mb"]
    print(f"P4 ({args.backbone}, N={args.units}, batch {args.batch}, {args.size}px, {args.device})")
    for r in rows:
        print(
            f"  {r['variant']:<11} params {r['params_m']:6.1f} M  step peak {r['peak_mb']:8.1f} MB "
            f"(x{r['peak_mb'] / static:.2f})  saved for backward {r['saved_mb']:8.1f} MB "
            f"(x{r['saved_mb'] / static_saved:.2f})"
        )


if __name__ == "__main__":
    main()
