"""Linear CKA (GPPF App. A): the formula against a hand-computed value, its invariances, and
`python -m gppf.tools.cka` on the staged test run's checkpoints (1.0 against itself, a heat map)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gppf.tools.cka import cka_matrix, linear_cka
from gppf.tools.cka import main as cka_main


def test_linear_cka_equals_a_hand_computed_value():
    # Both already column-centred. X'X = diag(2, 2): ||X'X||_F = sqrt(8); Y'Y = diag(8, 2):
    # ||Y'Y||_F = sqrt(68); Y'X = [[4, 0], [0, 2]]: ||Y'X||_F^2 = 20.
    # CKA = 20 / (sqrt(8) sqrt(68)) = 10 / sqrt(136) = 0.857493...
    x = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]])
    y = torch.tensor([[2.0, 0], [0, 1], [-2, 0], [0, -1]])
    assert linear_cka(x, y) == pytest.approx(10 / math.sqrt(136), abs=1e-12)
    # Centring is part of CKA: shifting either side changes nothing.
    assert linear_cka(x + 5, y - 3) == pytest.approx(10 / math.sqrt(136), abs=1e-12)


def test_invariances_and_both_forms_agree():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-12)  # rotation and scale
    y = torch.randn(40, 9, generator=g, dtype=torch.float64)
    v = linear_cka(x, y)
    assert 0.0 < v < 0.6
    # Fewer examples than features: the n x n Gram form; the same value as the feature form.
    wide_x, wide_y = x[:5], y[:5]
    gram = linear_cka(torch.cat([wide_x, torch.zeros(5, 20, dtype=torch.float64)], 1), wide_y)
    assert gram == pytest.approx(linear_cka(wide_x, wide_y), abs=1e-12)
    assert cka_matrix([x, y], [x]) == [[pytest.approx(1.0)], [pytest.approx(v)]]
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(x, y[:10])


def test_cka_command_against_itself_writes_ones_and_a_heat_map(staged_run, tmp_path):
    result, _, _ = staged_run
    ckpt = result["checkpoint"]
    # The command's main in this process: a subprocess would start a Ray of its own (~15 s).
    cka_main([ckpt, ckpt, "--task", "cls", "--max-images", "8", "-o", str(tmp_path)])
    same = json.loads((tmp_path / "cka.json").read_text())
    assert same["a"]["layers"] == ["stem", "layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert same["images"] == 8
    assert same["diagonal"] == pytest.approx([1.0] * 5, abs=1e-6)
    assert (tmp_path / "cka.png").stat().st_size > 5000


def test_cka_between_two_checkpoints_and_between_two_routes(staged_run):
    from gppf.tools.cka import cka

    result, run, _ = staged_run
    ckpt = result["checkpoint"]
    # The first checkpoint of the run (in stage 1: cls alone) against the last one.
    first = min(run.glob("checkpoint_*"), key=lambda p: p.stat().st_mtime)
    two = cka(first, ckpt, "cls", max_images=8)
    assert all(0.0 <= v <= 1.0 + 1e-9 for row in two["matrix"] for v in row)
    assert min(two["diagonal"]) < 0.999  # training moved some layer

    # Two tasks' routes in one checkpoint: the shared stem is one network, so CKA 1 there.
    routes = cka(ckpt, None, "seg", route_a="cls", route_b="seg", max_images=4)
    assert (routes["a"]["route"], routes["b"]["route"]) == ("cls", "seg")
    assert routes["diagonal"][0] == pytest.approx(1.0, abs=1e-6)
    assert len(routes["matrix"]) == 5 and len(routes["matrix"][0]) == 5
    with pytest.raises(ValueError, match="no route for task 'nope'"):
        cka(ckpt, None, "seg", route_a="nope", max_images=4)
