"""benchmarks/gpu_check.py shrunk on the CPU (its GPU figures need a lent GPU): every section runs
through the platform's step and reports what cannot vary between machines: finite AMP losses
that differ from fp32's, the host syncs tests/test_host_syncs.py expects, hard routes saving
exactly the static trunk's bytes for backward, torch.compile's losses equal to eager's, and the
notice that the figures are not GPU figures. No timing is asserted."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from benchmarks import gpu_check


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_check") / "figures.json"
    threads, out = torch.get_num_threads(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out):
            rc = gpu_check.main(["--device", "cpu", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    print(out.getvalue())  # shown with the test's output when it fails
    return rc, json.loads(path.read_text()), out.getvalue()


def test_every_section_ran_shrunk_and_says_so(shrunk):
    rc, r, text = shrunk
    assert rc == 0, {k: v["error"] for k, v in r.items() if isinstance(v, dict) and "error" in v}
    lines = text.splitlines()
    assert (
        lines[0]
        == lines[-1]
        == gpu_check.CPU_NOTICE
        == "no GPU: ran shrunk on CPU; figures are not GPU figures"
    )
    assert r["shrunk"] is True and r["device"] == "cpu" and r["sizes"]["backbone"] == "resnet10t"
    for key in ("amp", "p5", "p4", "syncs", "compile"):
        assert "error" not in r[key], (key, r[key])
        assert any(line.startswith(f"[{key}] ") for line in lines), key
    assert "FAILED" not in text


def test_amp_losses_are_finite_and_not_fp32s(shrunk):
    _, r, text = shrunk
    amp = r["amp"]
    assert set(amp["losses"]) == {"fp32", "bf16", "fp16"}
    for name in ("bf16", "fp16"):
        assert len(amp["losses"][name]) == amp["steps"] and amp[name]["finite"]
        assert 0 < amp[name]["step0_rel_diff"] <= amp[name]["max_rel_diff"] < math.inf  # autocast did act
    assert amp["fp16_skipped_steps"] >= 0 and "fp16_final_scale" in amp  # the trainer's GradScaler ran
    assert "the trainer ignores train.amp on CPU" in text  # what the CPU run substitutes is said


def test_simt_and_single_task_both_stepped(shrunk):
    p5 = shrunk[1]["p5"]
    assert p5["tasks"] == 2 and 1 <= p5["simt_tasks_run"] <= 2
    assert all(v > 0 for v in p5["images_per_s"].values()) and p5["simt_over_single"] > 0


def test_memory_of_lego_trunks(shrunk):
    p4 = shrunk[1]["p4"]
    assert p4["measured"].startswith("bytes saved for backward")
    saved = {k: v["saved_mb"] for k, v in p4["rows"].items()}
    assert set(saved) == set(gpu_check.P4_VARIANTS)
    # One unit per layer: the static network's activations (and the route's few bytes).
    assert saved["hard"] == pytest.approx(saved["static"], rel=1e-3)
    assert saved["soft"] > saved["hard"] > saved["hard+ckpt"] and saved["soft"] > saved["soft+ckpt"]


def test_host_syncs_are_the_ones_test_host_syncs_expects(shrunk):
    rows = shrunk[1]["syncs"]["rows"]
    assert {k: v["events"] for k, v in rows.items()} == {
        "static/soft": ["Tensor.cpu"],
        "lego/soft": ["Tensor.cpu"],
        "lego/hard": ["Tensor.tolist", "Tensor.cpu"],
    }


def test_compile_section_ran_the_step(shrunk):
    _, r, text = shrunk
    c = r["compile"]
    assert c["backend"] == "aot_eager" and c["ok"] is True
    assert c["max_rel_diff_vs_eager"] < 1e-5 and c["graph_breaks"] >= 0
    assert "[compile] torch.compile (backend aot_eager) of the model in train_step: worked" in text
    assert c["step_ms"]["compiled"] > 0 and c["step_ms"]["eager"] > 0
