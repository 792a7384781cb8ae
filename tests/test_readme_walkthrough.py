"""Runs the "Add your dataset as a task plugin" walkthrough of docs/plugins.md (linked from the
README's section of that name), verbatim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _blocks() -> dict[str, str]:
    text = (REPO / "docs" / "plugins.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    out = {}
    for b in blocks:
        m = re.match(r"# (\S+\.py)\s+\(walkthrough: (\w+)\)", b)
        if m:
            out[m.group(1)] = b
    return out


def test_readme_has_the_walkthrough():
    assert set(_blocks()) == {"my_tasks.py", "run_with_my_task.py"}


@pytest.mark.timeout(600)
def test_walkthrough_runs(tmp_path):
    for name, code in _blocks().items():
        (tmp_path / name).write_text(code)
    (tmp_path / "jobs").symlink_to(REPO / "jobs")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "run_with_my_task.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout
    assert re.search(r"\n colour\s+\| neg_mae", table), table[-2000:]
    assert "demo_cls" in table and "demo_seg" in table
