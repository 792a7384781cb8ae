"""Text tables for the terminal: results of a run, sweeps, the capacity plan."""

from __future__ import annotations

from typing import Any


def results_table(metrics: dict[str, Any]) -> str:
    """The per-task validation table: primary metric at step 0 and at the end."""
    initial = metrics.get("initial_eval") or {}
    final = metrics.get("final_eval") or {}
    rows = [("task", "metric", "step 0", f"step {metrics.get('step', '?')}", "change")]
    for task, m in final.items():
        for key, value in m.items():
            before = initial.get(task, {}).get(key)
            rows.append(
                (
                    task,
                    key,
                    "-" if before is None else f"{before:.2f}",
                    f"{value:.2f}",
                    "-" if before is None else f"{value - before:+.2f}",
                )
            )
    return text_table(rows)


def text_table(rows: list[tuple[str, ...]] | list[list[str]]) -> str:
    """Rows of strings (the first is the header) as a ruled, left-aligned text table."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [line]
    for j, r in enumerate(rows):
        out.append("|".join(f" {c:<{widths[i]}} " for i, c in enumerate(r)))
        if j == 0:
            out.append(line)
    out.append(line)
    return "\n".join(out)
