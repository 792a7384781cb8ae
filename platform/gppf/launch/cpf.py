"""The CPF training protocol (VTD §4.3, App. H): curriculum -> pseudo-labels -> joint -> decoder finetuning.

Each phase is its own run under one protocol directory and starts from the previous phase's final
checkpoint (`model.init_from`):

    <protocol dir>/curriculum/         a fit on `curriculum.tasks` only (VTD: the data-hungry
                                       localisation decoders first)
    <protocol dir>/pseudo_labels/      the teacher (`pseudo_labels.teacher`, else the curriculum's
                                       checkpoint) labels `pseudo_labels.images` for task
                                       `pseudo_labels.task`, in that task's label format; it joins
                                       the task as an extra train root in the phases that follow
    <protocol dir>/joint/              every task of the job (its own train.steps, stages, sampler)
    <protocol dir>/decoder_finetune/   one fit, one stage per task: that task's head trains on its
                                       own data at lr x 0.1 with everything else frozen, so the
                                       final checkpoint is the merge (the shared network untouched)

A phase whose run directory holds results.json (pseudo-labels: pseudo_labels.json) is done and
skipped; one that holds checkpoints but no results continues in place from its newest
checkpoint; so running the protocol again continues where it stopped. A finished phase is not
redone when the config changes: delete its directory (and those of the phases after it).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gppf.config.base import apply_overrides
from gppf.config.cpf import DecoderFinetuneConfig, ProtocolConfig, PseudoLabelPhaseConfig
from gppf.config.job import JobConfig, StageConfig
from gppf.tools.pseudo_labels import SUMMARY


@dataclass
class _Overridable:
    cpf: ProtocolConfig  # so that override errors name the key as it was given: cpf.<key>


def apply_protocol_overrides(proto: ProtocolConfig, overrides: list[str]) -> ProtocolConfig:
    """`cpf.a.b=value` strings (a job's `--set` keys of the protocol) applied to `proto`."""
    return apply_overrides(_Overridable(proto), overrides).cpf


def phase_config(job: JobConfig, phase: str, directory: Path, init_from: str | None) -> JobConfig:
    """The job as one phase's run: its own run directory and name, and the previous phase's
    checkpoint as its weights (the job's backbone.init_from only where nothing came before)."""
    cfg = copy.deepcopy(job)
    cfg.name = f"{job.name}_{phase}"
    cfg.run_dir, cfg.run_name = str(directory), phase
    if init_from:
        cfg.model.init_from = init_from
        cfg.backbone.init_from = ""  # it would overwrite the chained backbone
    return cfg


def decoder_stages(cfg: JobConfig, d: DecoderFinetuneConfig) -> list[StageConfig]:
    """One stage per head: only that task runs, everything but its head is frozen (BN in eval),
    with a warmup-free cosine of its own at lr x lr_factor."""
    shared = ["backbone.*"] + (["neck.*"] if cfg.model.neck else [])
    return [
        StageConfig(
            name=f"decoder_{task}",
            steps=d.steps,
            tasks=[task],
            freeze=shared + [f"heads.{other}.*" for other in cfg.tasks if other != task],
            lr_factor=d.lr_factor,
            schedule="stage",
        )
        for task in d.tasks or list(cfg.tasks)
    ]


def fit_phase(cfg: JobConfig) -> dict[str, Any]:
    """Fit one phase, or take its results if it finished before, or continue it in place."""
    from gppf.launch.fit import fit

    run = Path(cfg.run_dir) / cfg.run_name
    done = run / "results.json"
    if done.is_file():
        print(f"[gppf] cpf: phase {cfg.run_name} finished before ({run}); skipped", flush=True)
        return json.loads(done.read_text())
    resume = str(run) if any(run.glob("checkpoint_*")) else None
    if resume:
        print(f"[gppf] cpf: phase {cfg.run_name} continues in {run}", flush=True)
    t0 = time.time()
    metrics = fit(cfg, resume_from=resume)
    took = time.time() - t0
    print(f"[gppf] cpf: phase {cfg.run_name}: {metrics.get('step')} steps in {took:.0f}s", flush=True)
    return metrics


def label_phase(job: JobConfig, p: PseudoLabelPhaseConfig, teacher: str, out: Path) -> dict[str, Any]:
    """Pseudo-labels for task `p.task`, with the student's task config (its label layout) and data."""
    from gppf.api.registry import build_tasks
    from gppf.launch.fit import resolve
    from gppf.tools.pseudo_labels import label_images

    if (out / SUMMARY).is_file():
        print(f"[gppf] cpf: phase pseudo_labels finished before ({out}); skipped", flush=True)
        return json.loads((out / SUMMARY).read_text())
    shutil.rmtree(out, ignore_errors=True)  # an interrupted labelling starts over
    single = copy.deepcopy(job)
    single.tasks, single.stages = {p.task: job.tasks[p.task]}, []
    (task,) = build_tasks(resolve(single))  # absolute data root, derived fields (num_classes)
    return label_images(teacher, task, p.images, out, p)


def run_protocol(job: JobConfig, proto: ProtocolConfig, directory: str | Path) -> dict[str, dict[str, Any]]:
    """Run the phases in order under `directory`; returns each phase's results (the fits'
    metrics, the pseudo-labels' summary)."""
    proto.check(job)
    directory = Path(directory).expanduser().absolute()
    directory.mkdir(parents=True, exist_ok=True)
    job = copy.deepcopy(job)
    results: dict[str, dict[str, Any]] = {}
    chain: str | None = None
    if proto.curriculum.tasks:
        cfg = phase_config(job, "curriculum", directory, None)
        cfg.tasks = {t: job.tasks[t] for t in proto.curriculum.tasks}
        cfg.train.steps, cfg.stages = proto.curriculum.steps, []
        results["curriculum"] = fit_phase(cfg)
        chain = results["curriculum"]["checkpoint"]
    p = proto.pseudo_labels
    if p.task:
        out = directory / "pseudo_labels"
        results["pseudo_labels"] = label_phase(job, p, p.teacher or str(chain), out)
        entry = job.tasks[p.task]
        entry["extra_train_roots"] = [*entry.get("extra_train_roots", []), str(out)]
    results["joint"] = fit_phase(phase_config(job, "joint", directory, chain))
    chain = results["joint"]["checkpoint"]
    if proto.decoder_finetune.steps:
        cfg = phase_config(job, "decoder_finetune", directory, chain)
        cfg.stages = decoder_stages(cfg, proto.decoder_finetune)
        cfg.train.steps = sum(s.steps for s in cfg.stages)
        results["decoder_finetune"] = fit_phase(cfg)
    return results


def summary(results: dict[str, dict[str, Any]]) -> str:
    """Each phase's table (runner.results_table; the pseudo-labels' figures) and the final checkpoint."""
    from gppf.tools.tables import results_table

    lines = []
    for phase, m in results.items():
        if phase == "pseudo_labels":
            figures = ", ".join(
                f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in m.items()
                if k not in ("task", "teacher", "image_dir", "out")
            )
            lines += [f"\n[gppf] cpf pseudo_labels for {m['task']} in {m['out']}:", f"  {figures}"]
            continue
        lines += [
            f"\n[gppf] cpf {phase}: {m.get('step')} steps, run directory {m.get('run_dir')}",
            results_table(m),
        ]
    last = [m for phase, m in results.items() if phase != "pseudo_labels"][-1]
    lines.append(f"\n[gppf] cpf final checkpoint: {last.get('checkpoint')}")
    return "\n".join(lines)
