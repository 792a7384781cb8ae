"""Selection analysis of a lego backbone: which unit each task picks per layer (GPPF Fig. 3) and
how its selection probabilities moved over training (Fig. 11).

    python -m gppf.tools.plots RUN_DIR                 # from metrics.jsonl (history) of a run
    python -m gppf.tools.plots CHECKPOINT_DIR -o out/  # from a checkpoint's controller logits (final only)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def routes_from_checkpoint(ckpt_dir: str | Path) -> dict[str, dict[str, Any]]:
    import torch

    from gppf.io.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt_dir)["model"]
    out = {}
    for key, logits in state.items():
        if ".controller.logits." in f".{key}":
            task = key.rsplit(".", 1)[-1]
            probs = torch.softmax(logits.float(), -1)
            out[task] = {"route": probs.argmax(-1).tolist(), "probs": probs.tolist()}
    if not out:
        raise ValueError(f"{ckpt_dir}: the checkpoint has no lego controller (backbone.kind=static?)")
    return out


def history_from_metrics(path: str | Path) -> tuple[list[int], list[dict[str, dict[str, Any]]]]:
    steps, routes = [], []
    for line in Path(path).read_text().splitlines():
        m = json.loads(line)
        if "routes" in m:
            steps.append(m["step"])
            routes.append(m["routes"])
    return steps, routes


def plot_selection(routes: dict[str, dict[str, Any]], out: Path) -> Path:
    """Fig. 3: one row per task, one column per lego layer, colour = probability of the chosen unit,
    text = the chosen unit's index."""
    tasks = sorted(routes)
    chosen = np.array([routes[t]["route"] for t in tasks])
    conf = np.array([[p[k] for p, k in zip(routes[t]["probs"], routes[t]["route"])] for t in tasks])
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * chosen.shape[1] + 2), 0.6 * len(tasks) + 1.5))
    im = ax.imshow(conf, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(chosen.shape[0]):
        for j in range(chosen.shape[1]):
            ax.text(j, i, str(chosen[i, j]), ha="center", va="center", color="w" if conf[i, j] < 0.6 else "k")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xticks(range(chosen.shape[1]))
    ax.set_xlabel("lego layer (0 = stem)")
    ax.set_title("chosen unit per layer (colour: its selection probability)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    path = out / "selection.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_history(steps: list[int], history: list[dict[str, dict[str, Any]]], out: Path) -> Path:
    """Fig. 11: probability of unit 0 per layer over training, one panel per task."""
    tasks = sorted(history[-1])
    fig, axes = plt.subplots(len(tasks), 1, figsize=(8, 2.4 * len(tasks)), squeeze=False, sharex=True)
    for ax, task in zip(axes[:, 0], tasks):
        p0 = np.array([[p[0] for p in h[task]["probs"]] for h in history])  # [time, layers]
        for layer in range(p0.shape[1]):
            ax.plot(steps, p0[:, layer], lw=1, label=f"layer {layer}")
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"{task}\np(unit 0)")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    path = out / "selection_history.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def draw(source: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draw from a run directory (metrics.jsonl: history and final) or a checkpoint directory."""
    source = Path(source)
    out = Path(out) if out else source
    out.mkdir(parents=True, exist_ok=True)
    if (source / "metrics.jsonl").exists():
        steps, history = history_from_metrics(source / "metrics.jsonl")
        if not history:
            raise ValueError(f"{source}/metrics.jsonl has no routes (backbone.kind=static?)")
        return [plot_selection(history[-1], out), plot_history(steps, history, out)]
    return [plot_selection(routes_from_checkpoint(source), out)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="run directory (with metrics.jsonl) or checkpoint directory")
    ap.add_argument("-o", "--out", default=None, help="output directory (default: the source)")
    args = ap.parse_args()
    for p in draw(args.source, args.out):
        print(p)


if __name__ == "__main__":
    main()
