"""What a sweep leaves behind (gppf.launch.sweep): progress lines while it runs, then in its directory

    results.csv              one row per trial: status, parameters, last evaluation, objective
    objective_vs_params.png  the objective against each parameter (hollow: stopped early)
    best_overrides.json      the sweep's additions and the best trial's values: `--set-file` input
    sweep_results.json       all of the above as data

and the same table in the terminal. Each trial's run (TensorBoard logs, metrics.jsonl,
checkpoints) is in runs/<trial id>.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from gppf.launch.search_space import is_grid, is_log
from gppf.tools.tables import text_table

if TYPE_CHECKING:
    from gppf.config.sweep import SweepConfig

FINISHED = ("TERMINATED", "ERROR")


def short(key: str) -> str:
    """A parameter's name in tables: the config key without its section (tasks., backbone., model.)."""
    head, _, rest = key.partition(".")
    return rest or head


def shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if value == "":
        return "''"
    return str(value)


class Progress(Callback):
    """One line per trial start, evaluation and end, with the sweep's elapsed time and ETA."""

    def __init__(self, sweep: SweepConfig, keys: list[str], total: int):
        self.sweep = sweep
        self.keys = keys
        self.total = total

    def setup(self, **info: Any) -> None:
        self.t0 = time.time()
        self.done_before: int | None = None  # finished in an earlier call (a resumed sweep)
        self.done = 0

    def _params(self, trial: Any) -> str:
        return ", ".join(f"{short(k)}={shown(trial.config.get(k))}" for k in self.keys)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.done_before is None:
            self.done_before = sum(t.status in FINISHED for t in trials)
        print(f"[gppf] trial {trial.trial_id} started: {self._params(trial)}", flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        print(
            f"[gppf] trial {trial.trial_id} step {result.get('step')}: "
            f"{self.sweep.objective} {result.get('objective', float('nan')):.2f}",
            flush=True,
        )

    def _finished(self, trial: Any, what: str) -> None:
        self.done += 1
        done = (self.done_before or 0) + self.done
        elapsed = time.time() - self.t0
        left = max(0, self.total - done)
        eta = f", ETA {elapsed / self.done * left / 60:.1f} min" if left else ""
        print(
            f"[gppf] trial {trial.trial_id} {what} ({done}/{self.total} done; elapsed "
            f"{elapsed / 60:.1f} min{eta})",
            flush=True,
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if last.get("final"):
            what = f"finished at step {last.get('step')}: {self.sweep.objective} {last['objective']:.2f}"
        elif "objective" in last:
            what = f"stopped early at step {last.get('step')}: {self.sweep.objective} {last['objective']:.2f}"
        else:
            what = "ended before its first evaluation"
        self._finished(trial, what)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        what = "diverged (non-finite loss)" if _diverged(trial) else "failed"
        self._finished(trial, f"{what}: see {trial.path}/error.txt")


def _diverged(trial: Any) -> bool:
    """A trial whose run stopped on a non-finite loss: a result of its values, not a crash."""
    error = Path(trial.path) / "error.txt"
    return error.is_file() and "NonFiniteLossError" in error.read_text(errors="replace")


def _status(trial: Any) -> str:
    last = trial.last_result or {}
    if trial.status == "ERROR":
        return "diverged" if _diverged(trial) else "error"
    if trial.status != "TERMINATED":
        return "unfinished"
    return "completed" if last.get("final") else f"stopped at step {last.get('step', 0)}"


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value  # numpy scalars -> JSON


def rows_of(trials: list[Any], keys: list[str]) -> list[dict[str, Any]]:
    rows = []
    for t in sorted(trials, key=lambda t: t.trial_id):
        last = t.last_result or {}
        metrics = {
            k: v
            for k, v in last.items()
            if "/" in k and isinstance(v, (int, float)) and not k.startswith("config/")
        }
        rows.append(
            {
                "trial": t.trial_id,
                "status": _status(t),
                "step": last.get("step"),
                "params": {k: _plain(t.config.get(k)) for k in keys},
                "metrics": metrics,
                "objective": last.get("objective"),
            }
        )
    return rows


def best_row(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The best objective among completed trials (an early-stopped trial's last value is from an
    earlier step, so it is not comparable), or among all trials if none completed."""
    scored = [r for r in rows if r["objective"] is not None and math.isfinite(r["objective"])]
    pool = [r for r in scored if r["status"] == "completed"] or scored
    if not pool:
        return None
    pick = max if mode == "max" else min
    return pick(pool, key=lambda r: r["objective"])


def write_csv(path: Path, rows: list[dict[str, Any]], keys: list[str]) -> None:
    metric_keys = sorted({k for r in rows for k in r["metrics"]})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "status", "step", *keys, *metric_keys, "objective"])
        for r in rows:
            w.writerow(
                [r["trial"], r["status"], r["step"], *(r["params"][k] for k in keys)]
                + [r["metrics"].get(k, "") for k in metric_keys]
                + [r["objective"]]
            )


def plot(path: Path, rows: list[dict[str, Any]], space: dict[str, Any], objective: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(space)
    cols = min(4, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False)
    scored = [r for r in rows if r["objective"] is not None]
    for ax, key in zip(axes.flat, keys):
        values = [r["params"][key] for r in scored]
        categorical = any(isinstance(v, (str, bool)) or v is None for v in values)
        if categorical:
            labels = sorted({shown(v) for v in values})
            xs = [labels.index(shown(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        else:
            xs = values
            if is_log(space[key]):
                ax.set_xscale("log")
        done = [r["status"] == "completed" for r in scored]
        ys = [r["objective"] for r in scored]
        for filled in (True, False):
            pts = [(x, y) for x, y, d in zip(xs, ys, done) if d == filled]
            if pts:
                ax.scatter(*zip(*pts), facecolors="C0" if filled else "none", edgecolors="C0", s=28)
        ax.set_xlabel(short(key), fontsize=8)
        ax.set_ylabel(objective, fontsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(f"{objective} per trial (hollow: stopped early)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def expected_trials(space: dict[str, Any], num_samples: int) -> int:
    grid = math.prod(len(v["grid_search"]) for v in space.values() if is_grid(v))
    return num_samples * grid


def write(
    path: Path,
    space: dict[str, Any],
    sweep: SweepConfig,
    additions: dict[str, Any],
    steps: int,
    applies_to: str = "",
) -> dict[str, Any]:
    """Table, plot, best override file and summary of the sweep in `path` (complete or not)."""
    from ray.tune import ExperimentAnalysis

    keys = list(space)
    trials = ExperimentAnalysis(str(path)).trials
    rows = rows_of(trials, keys)
    complete = len(rows) >= expected_trials(space, sweep.num_samples) and all(
        r["status"] not in ("unfinished",) for r in rows
    )
    best = best_row(rows, sweep.mode)
    files = {"table": str(path / "results.csv"), "plot": str(path / "objective_vs_params.png")}
    write_csv(path / "results.csv", rows, keys)
    plot(path / "objective_vs_params.png", rows, space, sweep.objective)
    best_file = path / "best_overrides.json"
    if complete and best is not None:
        best_file.write_text(json.dumps({**additions, **best["params"]}, indent=2) + "\n")
        files["best_overrides"] = str(best_file)
    summary = {
        "name": sweep.name,
        "objective": sweep.objective,
        "mode": sweep.mode,
        "steps": steps,
        "complete": complete,
        "trials": rows,
        "best": best,
        "files": files,
        "applies_to": applies_to,
    }
    (path / "sweep_results.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def report(summary: dict[str, Any], seconds: float) -> str:
    """The terminal's end of a sweep: counts, the table (best first) and where the files are."""
    rows = summary["trials"]
    if not rows:
        return f"[gppf] sweep {summary['name']}: no trial ran"
    keys = list(rows[0]["params"])
    # Each task's primary (first) metric; results.csv has them all.
    primary: dict[str, str] = {}
    for r in rows:
        for k in r["metrics"]:
            task = k.split("/")[0]
            if task != "multitask":
                primary.setdefault(task, k)
    metric_keys = list(primary.values())
    sign = -1 if summary["mode"] == "max" else 1
    ordered = sorted(rows, key=lambda r: (r["objective"] is None, sign * (r["objective"] or 0.0)))
    table = [["trial", "status", *(short(k) for k in keys), *metric_keys, "objective"]]
    for r in ordered:
        table.append(
            [r["trial"], r["status"], *(shown(r["params"][k]) for k in keys)]
            + [f"{r['metrics'][k]:.2f}" if k in r["metrics"] else "-" for k in metric_keys]
            + ["-" if r["objective"] is None else f"{r['objective']:.2f}"]
        )
    counts: dict[str, int] = {}
    for r in rows:
        kind = "stopped early" if r["status"].startswith("stopped") else r["status"]
        counts[kind] = counts.get(kind, 0) + 1
    lines = [
        f"\n[gppf] sweep {summary['name']}: {len(rows)} trials ("
        + ", ".join(f"{n} {k}" for k, n in counts.items())
        + f") in {seconds / 60:.1f} min; objective {summary['objective']} ({summary['mode']})",
        text_table(table),
        f"[gppf] table: {summary['files']['table']}; plot: {summary['files']['plot']}",
    ]
    best = summary["best"]
    if best is not None and "best_overrides" in summary["files"]:
        path = summary["files"]["best_overrides"]
        lines.append(
            f"[gppf] best trial {best['trial']}: {summary['objective']} {best['objective']:.2f}; its "
            f"overrides: {path}"
        )
        if summary.get("applies_to"):
            lines.append(f"[gppf] train it: python {summary['applies_to']} --set-file {path}")
    return "\n".join(lines)
