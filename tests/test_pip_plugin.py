"""A third-party plugin as a user ships it: its own installed distribution (a dist-info with an
entry point in the `gppf.tasks` group, what `pip install` writes), no `data_root` (its data comes
with it), added to a bundled job by `--set-file` and selected by `--tasks`. The job runs as
`ray job submit -- python jobs/gppf_r50.py ...` runs it on the head node: a fresh process that
starts its own Ray, whose workers find the plugin through the entry point alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PLUGIN = '''
"""Synthetic colour regression: images drawn from a seed, nothing read from disk."""
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gppf.api.task import DataSource, Evaluator, Task
from gppf.config.task import TaskConfig
from gppf.data.stream import items_dataset


@dataclass
class SyntheticConfig(TaskConfig):
    images: int = 64


class Head(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Linear(channels, 1)

    def forward(self, feats):
        return self.fc(feats[-1].mean((2, 3))).squeeze(1)


class MAE(Evaluator):
    primary = "neg_mae"

    def __init__(self):
        self.sums = torch.zeros(2, dtype=torch.float64)

    def update(self, outputs, batch):
        self.sums += torch.tensor([(outputs - batch["target"]).abs().sum().item(), len(outputs)])

    def state(self):
        return self.sums.clone()

    def load_state(self, state):
        self.sums = state.clone()

    def compute(self):
        return {"neg_mae": -(self.sums[0] / self.sums[1].clamp(min=1)).item()}


class SyntheticColourTask(Task):
    config_cls = SyntheticConfig
    needs_data_root = False

    def source(self, split):
        n = self.cfg.images if split == "train" else self.cfg.images // 4
        offset = 0 if split == "train" else 10**6
        return DataSource(units=[{"index": offset + i} for i in range(n)], read=items_dataset)

    def preprocess(self, batch, train, seed):
        s = self.cfg.input_size
        levels = np.array([np.random.default_rng(int(i)).uniform() for i in batch["index"]])
        images = np.broadcast_to((levels * 255).astype(np.uint8)[:, None, None, None], (len(levels), 3, s, s))
        return {"image": np.ascontiguousarray(images), "target": levels.astype(np.float32)}

    def build_head(self, features):
        return Head(features[-1].channels)

    def loss(self, outputs, batch):
        return nn.functional.smooth_l1_loss(outputs, batch["target"])

    def evaluator(self):
        return MAE()
'''


def _install(site: Path) -> None:
    """The files `pip install` leaves for a package `synthetic_colour` 0.1 with an entry point."""
    (site / "synthetic_colour").mkdir(parents=True)
    (site / "synthetic_colour" / "__init__.py").write_text(PLUGIN)
    info = site / "synthetic_colour-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: synthetic-colour\nVersion: 0.1\n")
    entry = "synthetic_colour = synthetic_colour:SyntheticColourTask"
    (info / "entry_points.txt").write_text(f"[gppf.tasks]\n{entry}\n")
    (info / "RECORD").write_text("")


def test_installed_plugin_without_data_root_added_by_set_file_and_selected_by_tasks(tmp_path, demo_root):
    site = tmp_path / "site"
    _install(site)
    extra = tmp_path / "extra.json"
    # No data_root: the plugin says it needs none (`needs_data_root = False`).
    task = {"type": "synthetic_colour", "batch_size": 8, "input_size": 32, "images": 32}
    extra.write_text(json.dumps({"tasks.gen": task}))
    sets = [
        "train.steps=2",
        "train.eval_max_batches=1",
        "train.eval_at_start=false",
        "train.checkpoint_every=0",
        "scaling.num_workers=1",  # one worker group member: the plugin's import is what is tested
        "data.chunk_rows=16",
        "data.min_rows_per_pass=16",
        f"run_dir={tmp_path / 'runs'}",
    ]
    argv = ["--demo-root", str(demo_root), "--demo-images", "48", "--set-file", str(extra), "--tasks", "gen"]
    argv += [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(site), "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "jobs/gppf_r50.py", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"\n gen\s+\| neg_mae", out), out[-2000:]
    assert "demo_cls" not in out and "demo_seg" not in out  # --tasks kept only the added task
    resolved = json.loads(next((tmp_path / "runs").rglob("config.json")).read_text())
    assert list(resolved["tasks"]) == ["gen"]
    assert resolved["tasks"]["gen"]["data_root"] == ""
    assert resolved["tasks"]["gen"]["plugin_module"] == "synthetic_colour"


def test_a_plugin_that_needs_data_root_says_so():
    from gppf.config.job import JobConfig
    from gppf.launch.fit import resolve

    cfg = JobConfig(tasks={"cls": {"type": "classification", "batch_size": 4}})
    with pytest.raises(ValueError, match=r"tasks\.cls\.data_root is not set .*needs_data_root = False"):
        resolve(cfg)
