"""An interrupted checkpoint write leaves the previous checkpoint loadable (weights_only)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from gppf.io.checkpoint import load_checkpoint, save_checkpoint


def test_exception_during_write_keeps_previous(tmp_path, monkeypatch):
    save_checkpoint({"step": 1, "w": torch.ones(10)}, tmp_path)
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip archive")  # some bytes reach the disk, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(10)}, tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    state = load_checkpoint(tmp_path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(10))
    save_checkpoint({"step": 3, "w": torch.full((10,), 3.0)}, tmp_path)  # a leftover .tmp is overwritten
    assert load_checkpoint(tmp_path)["step"] == 3


WRITER = """
import sys, torch
from gppf.io.checkpoint import save_checkpoint
step = 0
while True:
    step += 1
    save_checkpoint({"step": step, "w": torch.full((4_000_000,), float(step))}, sys.argv[1])
    print(step, flush=True)
"""


def test_kill_during_writes_never_leaves_a_torn_checkpoint(tmp_path):
    """SIGKILL a process that rewrites a 16 MB checkpoint in a loop, at several moments."""
    seen = set()
    for delay in (0.0, 0.03, 0.07, 0.1, 0.15, 0.2, 0.3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE)
        proc.stdout.readline()  # the first checkpoint is published; later writes are in flight
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = load_checkpoint(tmp_path)
        w = state["w"]
        assert torch.equal(w, torch.full_like(w, float(state["step"])))  # whole, one version
        seen.add(state["step"])
    assert len(seen) > 1, f"all kills landed on the same version: {seen}"
