"""Run a function in N local gloo processes and collect what each returns.

Used by the collective tests and the benchmarks; handy for testing a plugin's collectives too."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args, pg_timeout_s: float = 60.0) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout_s))
    try:
        result = ("ok", fn(rank, world, *args))
    except BaseException:  # report, don't hang the others silently
        result = ("error", traceback.format_exc())
    Path(out_dir, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    dist.destroy_process_group()


def run_distributed(fn, world: int, *args, timeout: float = 120.0, pg_timeout_s: float = 60.0) -> list:
    """fn(rank, world, *args) in `world` processes; returns the per-rank results (raises on error/hang).
    pg_timeout_s: the default process group's collective timeout."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_entry, args=(r, world, port, out_dir, fn, args, pg_timeout_s))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout}s (a collective hung)")
        results = []
        for r in range(world):
            f = Path(out_dir, f"{r}.pkl")
            if not f.exists():
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            status, value = pickle.loads(f.read_bytes())
            if status == "error":
                raise RuntimeError(f"rank {r} failed:\n{value}")
            results.append(value)
        return results
