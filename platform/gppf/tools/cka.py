"""Linear CKA between two networks, layer by layer (GPPF App. A), on a task's validation images.

    python -m gppf.tools.cka CKPT_A CKPT_B --task NAME            # two checkpoints, NAME's route in each
    python -m gppf.tools.cka CKPT --task NAME --route-a T1 --route-b T2   # two tasks' routes, one checkpoint

Each side runs its trunk in evaluation mode along a task's route (lego trunks; a static trunk has
one network) on the same validation images of task NAME (from CKPT_A's config), and every layer of
the trunk (`Trunk.analysis_layers()`: lego layers, or timm's blocks) is compared with every layer
of the other side. Writes cka.png (the heat map: A's layers down, B's across) and cka.json (the
matrix, the layer names and the diagonal) into --out.

Features are each layer's output averaged over its spatial positions ([images, channels]; with
`--pool flatten`, the whole map, which needs images x C x H x W floats per layer). Linear CKA
(Kornblith et al., 2019): CKA(X, Y) = ||Yc' Xc||_F^2 / (||Xc' Xc||_F ||Yc' Yc||_F), Xc, Yc the
column-centred features; it is 1 for two representations equal up to rotation and scale.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gppf.api.trunk import Trunk

POOLS = ("mean", "flatten")


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two feature matrices of the same examples ([n, p] and [n, q]), in float64.
    The Gram form (n x n) is used when it is the smaller one."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples on both sides; got {x.shape[0]} and {y.shape[0]} rows")
    x = x.double().flatten(1)
    y = y.double().flatten(1)
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    n = x.shape[0]
    if n < max(x.shape[1], y.shape[1]):
        k, ell = x @ x.T, y @ y.T  # <K, L> = ||Y'X||^2, ||K|| = ||X'X||
        num, den = (k * ell).sum(), k.norm() * ell.norm()
    else:
        num, den = (y.T @ x).square().sum(), (x.T @ x).norm() * (y.T @ y).norm()
    return float(num / den) if den > 0 else float("nan")


def cka_matrix(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[list[float]]:
    """Linear CKA of every layer in `a` against every layer in `b`."""
    return [[linear_cka(x, y) for y in b] for x in a]


def _pooled(out: torch.Tensor, channels_last: bool, pool: str) -> torch.Tensor:
    if pool == "flatten":
        return out.detach().float().flatten(1).cpu()
    if out.dim() == 4:  # average over the spatial positions
        return out.detach().float().mean((1, 2) if channels_last else (2, 3)).cpu()
    if out.dim() == 3:  # tokens [B, N, C]
        return out.detach().float().mean(1).cpu()
    return out.detach().float().flatten(1).cpu()


@torch.no_grad()
def layer_features(trunk: Trunk, route: str, images: list[torch.Tensor], pool: str = "mean") -> dict:
    """Every analysis layer's features over `images` (batches) along `route`'s path:
    {"layers": names, "features": [n, d] per layer}."""
    layers = trunk.analysis_layers()
    if not layers:
        raise ValueError(f"{type(trunk).__name__} has no analysis layers (Trunk.analysis_layers)")
    chunks: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [
        module.register_forward_hook(
            lambda _m, _i, out, i=i: chunks[i].append(_pooled(out, trunk.channels_last_layers, pool))
        )
        for i, (_, module) in enumerate(layers)
    ]
    was_training = trunk.training
    trunk.eval()
    try:
        for x in images:
            trunk(x, route)
    finally:
        for h in handles:
            h.remove()
        trunk.train(was_training)
    return {"layers": [n for n, _ in layers], "features": [torch.cat(c) for c in chunks]}


def _route(trunk: nn.Module, task: str, ckpt: str) -> str:
    routes = getattr(getattr(trunk, "controller", None), "logits", None)
    if routes is not None and task not in routes:
        raise ValueError(
            f"{ckpt}: its lego trunk has no route for task {task!r}; routes: {', '.join(routes)}"
        )
    return task


def cka(
    ckpt_a: str | Path,
    ckpt_b: str | Path | None,
    task: str,
    route_a: str | None = None,
    route_b: str | None = None,
    max_images: int = 256,
    pool: str = "mean",
) -> dict[str, Any]:
    """The layer-by-layer CKA matrix between checkpoint A along `route_a` and checkpoint B (A
    itself when None) along `route_b` (both default to `task`), on up to `max_images` of `task`'s
    validation images."""
    from gppf.data.stream import eval_batches
    from gppf.tools.evaluate import checkpoint_model

    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    (loaded_a, tasks_a) = checkpoint_model(ckpt_a)
    loaded_b = checkpoint_model(ckpt_b)[0] if ckpt_b else loaded_a
    by_name = {t.name: t for t in tasks_a}
    if task not in by_name:
        raise ValueError(f"{ckpt_a}: no task {task!r} in its config; tasks: {', '.join(by_name)}")
    t = by_name[task]
    trunk_a, trunk_b = loaded_a.model.backbone, loaded_b.model.backbone
    ra = _route(trunk_a, route_a or task, str(ckpt_a))
    rb = _route(trunk_b, route_b or task, str(ckpt_b or ckpt_a))
    images, n = [], 0
    batch_size = t.cfg.batch_size
    for batch in eval_batches(t, 0, 1, loaded_a.cfg.data, math.ceil(max_images / batch_size)):
        x = t.to_device(batch, torch.device("cpu"))[t.input_key()][: max_images - n]
        images.append(x)
        n += len(x)
        print(f"[gppf] cka: {n} images of {task!r} read", file=sys.stderr, flush=True)
        if n >= max_images:
            break
    if n < 2:
        raise ValueError(f"task {task!r}: CKA needs at least 2 validation images, found {n}")
    fa = layer_features(trunk_a, ra, images, pool)
    fb = layer_features(trunk_b, rb, images, pool)
    matrix = cka_matrix(fa["features"], fb["features"])
    same = fa["layers"] == fb["layers"]
    return {
        "a": {"checkpoint": str(ckpt_a), "route": ra, "layers": fa["layers"]},
        "b": {"checkpoint": str(ckpt_b or ckpt_a), "route": rb, "layers": fb["layers"]},
        "task": task,
        "images": n,
        "pool": pool,
        "matrix": matrix,
        "diagonal": [matrix[i][i] for i in range(len(matrix))] if same else None,
    }


def plot_heatmap(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.tensor(result["matrix"]).numpy()
    la, lb = result["a"]["layers"], result["b"]["layers"]
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(lb) + 2.5), max(4, 0.4 * len(la) + 2)))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="magma", origin="upper")
    if m.size <= 400:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{m[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="k" if m[i, j] > 0.6 else "w",
                )
    ax.set_yticks(range(len(la)), la, fontsize=7)
    ax.set_xticks(range(len(lb)), lb, fontsize=7, rotation=90)
    ax.set_ylabel(f"A: {Path(result['a']['checkpoint']).name}, route {result['a']['route']}")
    ax.set_xlabel(f"B: {Path(result['b']['checkpoint']).name}, route {result['b']['route']}")
    ax.set_title(f"linear CKA on {result['images']} {result['task']} images ({result['pool']})")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint_a", help="a checkpoint directory inside a gppf run directory")
    ap.add_argument("checkpoint_b", nargs="?", default=None, help="the other checkpoint (default: A)")
    ap.add_argument("--task", required=True, help="whose validation images (a task of A's config)")
    ap.add_argument("--route-a", default=None, help="A's lego route (default: --task)")
    ap.add_argument("--route-b", default=None, help="B's lego route (default: --task)")
    ap.add_argument("--max-images", type=int, default=256)
    ap.add_argument("--pool", choices=POOLS, default="mean")
    ap.add_argument("-o", "--out", default=".", help="directory for cka.png and cka.json")
    args = ap.parse_args(argv)
    try:
        result = cka(
            args.checkpoint_a,
            args.checkpoint_b,
            args.task,
            args.route_a,
            args.route_b,
            args.max_images,
            args.pool,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cka.json").write_text(json.dumps(result, indent=1))
    png = plot_heatmap(result, out / "cka.png")
    if result["diagonal"] is not None:
        print("layer-by-layer CKA (same layer in A and B):")
        for name, v in zip(result["a"]["layers"], result["diagonal"]):
            print(f"  {name:<24} {v:.4f}")
    print(out / "cka.json")
    print(png)


if __name__ == "__main__":
    main()
