"""Every `python -m gppf.*` command, run as a user runs it, on the staged test run's outputs
(`gppf.tools.cka` in tests/test_cka.py; the last test checks that no command is left untested)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import timm
import torch


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_export_writes_a_route_timm_loads(staged_run, tmp_path):
    result, _, _ = staged_run
    out = tmp_path / "seg_route.pt"
    proc = _run("gppf.tools.export", result["checkpoint"], "--task", "seg", "-o", str(out))
    assert "timm.create_model('resnet10t', num_classes=0)" in proc.stdout
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    missing = subprocess.run(
        [sys.executable, "-m", "gppf.tools.export", result["checkpoint"], "-o", str(tmp_path / "x.pt")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "pass --task, one of cls, det, seg" in missing.stderr


def test_evaluate_prints_the_checkpoints_metrics(staged_run):
    result, _, _ = staged_run
    proc = _run("gppf.tools.evaluate", result["checkpoint"], "--tasks", "cls,seg")
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 5 and cells[0] in ("cls", "seg"):
            rows[f"{cells[0]}/{cells[1]}"] = float(cells[3])
    assert set(rows) == {"cls/top1", "seg/mIoU", "seg/pixel_acc"}
    # The run's final evaluation covered the whole classification split too (2 ranks x 1 batch).
    assert rows["cls/top1"] == round(result["final_eval"]["cls"]["top1"], 2)


def test_plots_redraws_the_selection_figures(staged_run, tmp_path):
    _, run, _ = staged_run
    proc = _run("gppf.tools.plots", str(run), "-o", str(tmp_path))
    assert {Path(p).name for p in proc.stdout.split()} == {"selection.png", "selection_history.png"}
    assert (tmp_path / "selection.png").stat().st_size > 1000


def test_demo_data_writes_every_dataset(tmp_path):
    _run("gppf.data.demo", str(tmp_path), "--train", "8", "--val", "4")
    meta = json.loads((tmp_path / "demo.json").read_text())
    assert meta["n_train"] == 8 and meta["n_val"] == 4
    for sub in ("classification", "classification_parquet", "segmentation", "detection", "depth"):
        assert any((tmp_path / sub).iterdir()), sub


def test_every_command_is_run_by_some_test():
    """A module of gppf with a `__main__` block is a command users run: some test must run it
    (`_run("gppf.<name>", ...)`, `python -m gppf.<name>`, or its `main(argv)` in process)."""
    root = Path(__file__).resolve().parents[1]
    commands = {
        ".".join(p.relative_to(root / "platform").with_suffix("").parts)
        for p in (root / "platform" / "gppf").rglob("*.py")
        if 'if __name__ == "__main__":' in p.read_text()
    }
    tests = "\n".join(p.read_text() for p in (root / "tests").glob("*.py"))  # helpers that tests run, too
    untested = sorted(
        c
        for c in commands
        if not any(
            form in tests
            for form in (f'"{c}"', f"-m {c}", f"{c.rsplit('.', 1)[1]}.main(", f"{c} import main")
        )
    )
    assert commands and not untested, untested
