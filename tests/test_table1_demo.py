"""benchmarks/table1_demo.py: its settings reach the runs' configs, its table and JSON hold every
setting's mean ± std, and a second call with the same --run-dir reuses the finished runs."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "table1_demo.py"
STEPS = 3


@pytest.fixture(scope="module")
def table1():
    spec = importlib.util.spec_from_file_location("table1_demo", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_settings_are_the_table1_ablations(table1, tmp_path):
    t1 = table1.parse_args(["--steps", "7", "--set", "optim.lr=0.01"])
    assert t1.settings == ("simt_xbn", "per_batch_xbn", "simt_local_bn", "lego_n2_hard")
    got = {}
    for key in t1.settings:
        cfg = table1.job_config(str(tmp_path), table1.BY_KEY[key], 2, t1, tmp_path)
        assert set(cfg.tasks) == {"demo_cls", "demo_seg"} and cfg.train.steps == 7 and cfg.train.seed == 2
        assert not cfg.train.eval_at_start and cfg.optim.lr == 0.01 and cfg.run_name == f"{key}-seed2"
        b = cfg.backbone
        got[key] = (b.kind, cfg.train.sampler, b.cross_task_bn)
        if b.kind == "lego":
            assert (b.lego.num_units, b.lego.mode) == (2, "hard")
    assert got == {
        "simt_xbn": ("static", "simt", True),
        "per_batch_xbn": ("static", "per_batch", True),
        "simt_local_bn": ("static", "simt", False),
        "lego_n2_hard": ("lego", "simt", True),
    }
    with pytest.raises(SystemExit):
        table1.parse_args(["--settings", "simt_xbn,nope"])


def test_summary_is_mean_and_sample_std_over_seeds(table1):
    s = table1.BY_KEY["simt_xbn"]
    runs = [
        {"setting": "simt_xbn", "seed": i, "metrics": {"demo_cls": {"top1": c}, "demo_seg": {"mIoU": m}}}
        for i, (c, m) in enumerate([(70.0, 20.0), (80.0, 30.0), (90.0, 40.0)])
    ]
    (row,) = table1.summarise(runs, [s])
    assert row["demo_cls"]["mean"] == pytest.approx(80.0) and row["demo_cls"]["std"] == pytest.approx(10.0)
    assert row["demo_seg"]["mean"] == pytest.approx(30.0) and row["demo_seg"]["std"] == pytest.approx(10.0)
    (one,) = table1.summarise(runs[:1], [s])
    assert one["demo_cls"]["std"] is None  # one seed has no spread, not a spread of 0
    for r in runs:
        r["wall_s"] = 1.0
    md = table1.markdown([row], runs, table1.Table1Config(steps=5))
    assert "| static, SIMT + cross-task BN | 80.00 ± 10.00 | 30.00 ± 10.00 |" in md


def test_shrunk_table1_runs_and_writes_its_table(table1, ray_session, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        *("--steps", str(STEPS), "--seeds", "1", "--settings", "simt_xbn,per_batch_xbn"),
        *("--demo-root", str(tmp_path / "demo"), "--demo-images", "16"),
        *("--run-dir", str(tmp_path / "runs"), "--out", str(out)),
    ]
    # A few steps need a few batches, not the default 256-row chunks per task and worker.
    for s in ("data.chunk_rows=16", "data.min_rows_per_pass=16", "data.prefetch_batches=1"):
        argv += ["--set", s]
    argv += ["--set", "train.eval_max_batches=1"]
    result = table1.run(argv)
    printed = capsys.readouterr().out
    assert re.search(r"run 2/2 done in \d+s: demo_cls top1 [\d.]+, demo_seg mIoU [\d.]+; elapsed", printed)

    saved = json.loads((out / "table1_demo.json").read_text())
    assert saved["steps"] == STEPS and [r["setting"] for r in saved["summary"]] == [
        "simt_xbn",
        "per_batch_xbn",
    ]
    for run in saved["runs"]:
        cfg = json.loads((Path(run["run_dir"]) / "config.json").read_text())
        want = "per_batch" if run["setting"] == "per_batch_xbn" else "simt"
        assert cfg["train"]["sampler"] == want and cfg["train"]["steps"] == STEPS
        fitted = json.loads((Path(run["run_dir"]) / "results.json").read_text())
        assert (
            fitted["step"] == STEPS
            and fitted["final_eval"]["demo_seg"]["mIoU"] == run["metrics"]["demo_seg"]["mIoU"]
        )
    for row in saved["summary"]:
        for task, metric in (("demo_cls", "top1"), ("demo_seg", "mIoU")):
            entry = row[task]
            assert entry["metric"] == metric and len(entry["values"]) == 1 and entry["std"] is None
            assert 0.0 <= entry["mean"] <= 100.0
    md = (out / "table1_demo.md").read_text()
    for row in saved["summary"]:
        cls, seg = row["demo_cls"]["mean"], row["demo_seg"]["mean"]
        assert f"| {row['label']} | {cls:.2f} ± n/a | {seg:.2f} ± n/a |" in md
    assert md in printed

    # The same command again: both runs are finished, so nothing is trained a second time.
    again = table1.run(argv)
    assert printed.count("reusing") == 0 and capsys.readouterr().out.count("reusing the finished run") == 2
    assert again["summary"] == result["summary"] and again["runs_wall_s"] == result["runs_wall_s"]
    # Another length in the same place is not mistaken for those runs.
    with pytest.raises(FileExistsError, match="another configuration"):
        table1.run([*argv, "--steps", str(STEPS + 1)])
