"""jobs/cpf.py's embedded default, shrunk (2 curriculum steps, 2 joint steps, 1 step per head, tiny
chunks, no step-0 evaluation), run once: every phase runs from the previous one's checkpoint, the
segmentation pseudo-labels join that task, decoder finetuning leaves the shared network
bit-identical and changes every head, and running the job again skips every finished phase."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gppf.io.checkpoint import load_checkpoint
from tests.test_jobs import load_job

JOB = Path(__file__).resolve().parents[1] / "jobs/cpf.py"
TASKS = {"demo_cls", "demo_det", "demo_seg"}


@pytest.fixture(scope="module")
def cpf_run(ray_session, tmp_path_factory):
    """(job module, argv, returned metrics, printed output, protocol directory)."""
    root = tmp_path_factory.mktemp("cpf")
    sets = [
        "train.steps=2",
        "cpf.curriculum.steps=2",
        "cpf.decoder_finetune.steps=1",
        "train.log_every=1",
        "train.checkpoint_every=0",
        "train.eval_max_batches=1",
        "train.eval_at_start=false",
        "data.chunk_rows=16",
        "data.min_rows_per_pass=16",
        "data.prefetch_batches=1",
        f"run_dir={root / 'runs'}",
    ]
    argv = [
        "--demo-root",
        str(root / "demo"),
        "--demo-images",
        "48",
        *[a for s in sets for a in ("--set", s)],
    ]
    mod = load_job(JOB)
    out = io.StringIO()
    with redirect_stdout(out):
        metrics = mod.run(argv)
    return mod, argv, metrics, out.getvalue(), root / "runs" / "cpf_demo"


def _results(directory: Path, phase: str) -> dict:
    return json.loads((directory / phase / "results.json").read_text())


def _config(directory: Path, phase: str) -> dict:
    return json.loads((directory / phase / "config.json").read_text())


def test_every_phase_runs_and_prints_its_table(cpf_run):
    _, _, metrics, out, directory = cpf_run
    assert metrics["step"] == 3 and set(metrics["final_eval"]) == TASKS  # one step per head
    assert set(_results(directory, "curriculum")["final_eval"]) == {"demo_det", "demo_seg"}
    assert set(_results(directory, "joint")["final_eval"]) == TASKS
    steps = re.findall(r"\n\s*task\s*\|\s*metric\s*\|\s*step 0\s*\|\s*step (\d+)\s*\|\s*change", out)
    assert steps == ["2", "2", "3"], out[-3000:]  # curriculum, joint, decoder finetuning
    assert f"cpf final checkpoint: {metrics['checkpoint']}" in out
    assert re.search(r"cpf pseudo_labels for demo_seg in .*\n  confidence 0.30, score 0.50", out)


def test_each_phase_starts_from_the_previous_checkpoint(cpf_run):
    _, _, _, _, directory = cpf_run
    joint, decoder = _config(directory, "joint"), _config(directory, "decoder_finetune")
    assert joint["model"]["init_from"] == _results(directory, "curriculum")["checkpoint"]
    assert decoder["model"]["init_from"] == _results(directory, "joint")["checkpoint"]
    assert [(s["name"], list(s["tasks"]), s["lr_factor"]) for s in decoder["stages"]] == [
        (f"decoder_{t}", [t], 0.1) for t in ("demo_cls", "demo_det", "demo_seg")
    ]


def test_segmentation_pseudo_labels_join_the_task(cpf_run):
    _, argv, _, _, directory = cpf_run
    pseudo = directory / "pseudo_labels"
    summary = json.loads((pseudo / "pseudo_labels.json").read_text())
    assert summary["teacher"] == _results(directory, "curriculum")["checkpoint"]
    assert (summary["confidence"], summary["images"]) == (0.3, 48)
    det_images = sorted(p.name for p in (Path(argv[1]) / "detection/train2017").glob("*.jpg"))
    assert sorted(p.name for p in (pseudo / "train/images").iterdir()) == det_images
    labels = sorted((pseudo / "train/labels").glob("*.png"))
    assert [p.stem for p in labels] == [Path(n).stem for n in det_images]
    for png, image in zip(labels[:4], sorted((pseudo / "train/images").iterdir())):
        ids = np.asarray(Image.open(png))
        assert ids.shape == Image.open(image).size[::-1] and set(np.unique(ids)) <= {0, 1, 2, 3, 255}
    for phase in ("joint", "decoder_finetune"):
        assert _config(directory, phase)["tasks"]["demo_seg"]["extra_train_roots"] == [str(pseudo)]
        assert _config(directory, phase)["tasks"]["demo_det"]["extra_train_roots"] == []


def test_decoder_finetuning_keeps_the_shared_network_and_changes_every_head(cpf_run):
    _, _, metrics, _, directory = cpf_run
    before = load_checkpoint(_results(directory, "joint")["checkpoint"])["model"]
    after = load_checkpoint(metrics["checkpoint"])["model"]
    assert before.keys() == after.keys()
    shared = [k for k in before if not k.startswith("heads.")]  # backbone (and neck): tensors and buffers
    assert len(shared) > 100 and any("running_mean" in k for k in shared)
    changed = [k for k in shared if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]
    for task in TASKS:
        head = [k for k in before if k.startswith(f"heads.{task}.")]
        moved = [k for k in head if not torch.equal(before[k], after[k])]
        assert len(moved) >= len(head) // 2, (task, len(moved), len(head))


def test_running_again_skips_every_finished_phase(cpf_run):
    mod, argv, metrics, _, directory = cpf_run
    checkpoints = sorted(directory.glob("*/checkpoint_*"))
    out = io.StringIO()
    with redirect_stdout(out):
        again = mod.run(argv)
    assert again == metrics
    assert len(re.findall(r"phase (\w+) finished before", out.getvalue())) == 4
    assert sorted(directory.glob("*/checkpoint_*")) == checkpoints


def test_pseudo_labels_cli_writes_detection_labels_the_task_reads(cpf_run, tmp_path, capsys):
    """Detection through the real path (Ray Data actor, the curriculum's head): a COCO file the
    task reads back. --score 0 keeps every detection: a 2-step teacher is not confident."""
    from gppf.api.registry import build_tasks
    from gppf.launch.fit import resolve
    from gppf.tools import pseudo_labels

    mod, argv, _, _, directory = cpf_run
    images = tmp_path / "images"
    images.mkdir()
    for src in sorted((Path(argv[1]) / "detection/val2017").glob("*.jpg"))[:3]:
        (images / src.name).write_bytes(src.read_bytes())
    out = tmp_path / "pseudo_det"
    teacher = _results(directory, "curriculum")["checkpoint"]
    cmd = [
        teacher,
        "--task",
        "demo_det",
        "--images",
        str(images),
        "-o",
        str(out),
        "--score",
        "0",
        "--actors",
        "1",
    ]
    pseudo_labels.main(cmd)
    assert '"boxes_per_image"' in capsys.readouterr().out
    doc = json.loads((out / "annotations/instances_train2017.json").read_text())
    assert len(doc["images"]) == 3 and doc["annotations"]
    for a in doc["annotations"]:
        image = doc["images"][a["image_id"] - 1]
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= image["width"] + 1e-3 and y + h <= image["height"] + 1e-3
        assert a["segmentation"]["size"] == [image["height"], image["width"]]
    job = mod.demo_config(argv[1])
    job.tasks = {"demo_det": {**job.tasks["demo_det"], "extra_train_roots": [str(out)]}}
    (task,) = build_tasks(resolve(job))
    units = task.extra_train_units(task.source("train").read)
    assert len(units) == 3 and sum(len(json.loads(u["anns"])) for u in units) == len(doc["annotations"])
