from __future__ import annotations

import json

import torch

from gppf.io.checkpoint import save_checkpoint
from gppf.tools.plots import draw, routes_from_checkpoint


def _routes(p: float):
    return {t: {"route": [0, 1, 0], "probs": [[p, 1 - p], [1 - p, p], [0.5, 0.5]]} for t in ("cls", "seg")}


def test_draw_from_run_directory(tmp_path):
    lines = [{"step": s, "routes": _routes(0.5 + s / 200)} for s in (10, 20, 30)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines))
    paths = draw(tmp_path)
    assert [p.name for p in paths] == ["selection.png", "selection_history.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_draw_from_checkpoint(tmp_path):
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    save_checkpoint(
        {"model": {"backbone.controller.logits.cls": logits, "heads.cls.fc.weight": torch.ones(1)}}, tmp_path
    )
    routes = routes_from_checkpoint(tmp_path)
    assert routes["cls"]["route"] == [0, 1]
    out = tmp_path / "plots"
    assert draw(tmp_path, out)[0] == out / "selection.png"
