"""Instant resume: seconds from a stream's `load_state` to its first batch, resuming at batch k of
one long pass, with the chunks before batch k skipped by counting their rows (the platform) and
decoded and thrown away (the code before issue 13), and the rows each decodes on the way.

    python benchmarks/resume_bench.py [--positions 0,100,400,1600] [--decode-up-to 400]

Demo classification data (48 images, 64 px) repeated into a pass of --pass-rows rows; batch 16,
chunks of 256 rows. The decode path is timed only up to --decode-up-to (it grows with k).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray

import task_plugins  # noqa: F401
from gppf.api.registry import build_task
from gppf.config.job import StreamConfig
from gppf.data.demo import generate
from gppf.data.stream import TaskStream, configure_data_context
from gppf.dist.ray_env import ensure_ray


def first_batch(task, cfg: StreamConfig, taken: int, skip_by_counting: bool) -> tuple[float, int]:
    stream = TaskStream(task, seed=0, rank=0, world=1, cfg=cfg)
    rows: list[int] = []
    read = stream.read

    def counting(units):
        rows.append(len(units))
        return read(units)

    stream.read = counting
    if not skip_by_counting:
        stream.unit_rows = lambda unit: (_ for _ in ()).throw(KeyError(unit))
    stream.load_state({"pass_idx": 0, "taken": taken})
    t0 = time.perf_counter()
    stream.next()
    seconds = time.perf_counter() - t0
    stream.close()
    return seconds, sum(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", default="0,100,400,1600")
    ap.add_argument("--decode-up-to", type=int, default=400)
    ap.add_argument("--pass-rows", type=int, default=32768)
    args = ap.parse_args()
    ensure_ray()
    root = generate(tempfile.mkdtemp(prefix="gppf_resume_bench_"), n_train=48, n_val=8, seed=0)
    task = build_task(
        "cls", {"type": "classification", "data_root": str(root / "classification"), "batch_size": 16}
    )
    task.check_data()
    cfg = StreamConfig(min_rows_per_pass=args.pass_rows, chunk_rows=256, prefetch_batches=1)
    configure_data_context(cfg)
    first_batch(task, cfg, 0, True)  # warm the decode workers
    print(f"pass of {args.pass_rows} rows, batch 16, chunks of 256 rows (seconds to the first batch)")
    print(f"{'resume at batch':>16} {'counting':>10} {'rows':>7} {'decoding':>10} {'rows':>7}")
    for k in [int(x) for x in args.positions.split(",")]:
        fast, fast_rows = first_batch(task, cfg, k, True)
        if k <= args.decode_up_to:
            slow, slow_rows = first_batch(task, cfg, k, False)
            shown = f"{slow:>9.2f}s {slow_rows:>7}"
        else:
            shown = f"{'-':>10} {'-':>7}"
        print(f"{k:>16} {fast:>9.2f}s {fast_rows:>7} {shown}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
