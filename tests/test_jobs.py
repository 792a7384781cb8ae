"""Every file in jobs/ runs its embedded default (generated demo data, local Ray) for a few steps and
prints its results table: a job file that no test runs is a broken job file."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ALL_JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.py"))
# Jobs whose runs are not one table of train.steps steps have a test file of their own, which runs
# the embedded default the same way (shrunk) and checks more of it.
OWN_TEST = {"cpf": "test_cpf.py", "tune_gppf": "test_sweep.py", "tune_downstream": "test_transfer.py"}
JOBS = [p for p in ALL_JOBS if p.stem not in OWN_TEST]
STEPS = 2


def load_job(path: Path):
    """As `python jobs/<job>.py` imports it (a job file imports its configs from gppf.presets)."""
    spec = importlib.util.spec_from_file_location(f"job_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def job_demo_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("job_demo")


def test_every_job_file_is_listed():
    assert {p.stem for p in ALL_JOBS} >= {
        "gppf_r50",
        "gppf_swint",
        "demo_detection",
        "finetune",
        "adapt_finetune",
        "compl",
        "cpf",
        "tune_gppf",
        "tune_downstream",
    }
    for stem, test in OWN_TEST.items():
        assert f"jobs/{stem}.py" in (Path(__file__).parent / test).read_text()


@pytest.mark.parametrize("job", JOBS, ids=[p.stem for p in JOBS])
def test_job_embedded_default_runs_and_prints_its_table(job, job_demo_root, ray_session, tmp_path, capsys):
    from gppf.dist.terminal import is_noise
    from gppf.launch.cli import main

    mod = load_job(job)
    sets = [
        f"train.steps={STEPS}",
        "train.log_every=1",
        "train.checkpoint_every=0",
        "train.eval_max_batches=1",
        "train.eval_at_start=false",  # the end's evaluation fills the table; step 0 costs ~10 s a run
        # A 2-step run needs a few batches, not the default 256-row chunks per task and worker.
        "data.chunk_rows=16",
        "data.min_rows_per_pass=16",
        "data.prefetch_batches=1",
        f"run_dir={tmp_path}",
    ]
    argv = [
        "--demo-root",
        str(job_demo_root),
        "--demo-images",
        "48",
        *[a for s in sets for a in ("--set", s)],
    ]
    # A job with several runs (finetune.py: pretrain, then finetune) has its own `run`.
    run = getattr(mod, "run", None)
    metrics = run(argv) if run else main(mod.__doc__, mod.full_config, mod.demo_config, argv)
    captured = capsys.readouterr()
    out = captured.out
    # A quiet terminal (gppf.dist.terminal): none of Ray's per-dataset or per-worker-group lines.
    noise = [line for line in (out + captured.err).splitlines() if is_noise(line)]
    assert not noise, noise[:5]
    tasks = set(mod.demo_config(str(job_demo_root)).tasks)
    assert metrics["step"] == STEPS and set(metrics["final_eval"]) == tasks
    # The table of the job's (last) run: step 0 and the end for every metric it evaluated.
    headers = list(re.finditer(r"\n\s*task\s*\|\s*metric\s*\|\s*step 0\s*\|\s*step (\d+)\s*\|\s*change", out))
    assert headers and int(headers[-1].group(1)) == STEPS, out[-3000:]
    table = out[headers[-1].end() :]
    rows = re.findall(r"\n (\w+)\s*\| (\w+)\s*\| ([\d.-]+)\s*\| ([\d.-]+)\s*\|", table)
    assert {(t, k) for t, k, *_ in rows} == {(t, k) for t, m in metrics["final_eval"].items() for k in m}
