"""The CPF protocol's plumbing without running it (tests/test_cpf.py runs it): decoder stages,
phase configs and their chaining, the protocol's checks and `cpf.` overrides, and when a phase is
run, continued or skipped."""

from __future__ import annotations

import json

import pytest

from gppf.config.base import ConfigError
from gppf.config.cpf import CurriculumConfig, DecoderFinetuneConfig, ProtocolConfig, PseudoLabelPhaseConfig
from gppf.config.job import JobConfig, ModelConfig
from gppf.launch.cpf import apply_protocol_overrides, decoder_stages, fit_phase, phase_config


def _job() -> JobConfig:
    return JobConfig(name="j", tasks={"a": {"type": "segmentation"}, "b": {"type": "detection"}})


def test_decoder_stages_freeze_all_but_one_head():
    job = _job()
    stages = decoder_stages(job, DecoderFinetuneConfig(steps=5, lr_factor=0.1))
    assert [(s.name, s.tasks, s.freeze) for s in stages] == [
        ("decoder_a", ["a"], ["backbone.*", "heads.b.*"]),
        ("decoder_b", ["b"], ["backbone.*", "heads.a.*"]),
    ]
    assert all(s.steps == 5 and s.lr_factor == 0.1 and s.schedule == "stage" for s in stages)
    job.model = ModelConfig(neck="fpn")
    assert decoder_stages(job, DecoderFinetuneConfig(steps=1, tasks=["b"]))[0].freeze == [
        "backbone.*",
        "neck.*",
        "heads.a.*",
    ]


def test_phase_config_chains_the_previous_checkpoint(tmp_path):
    job = _job()
    job.backbone.init_from = "/models/imagenet.pth"
    first = phase_config(job, "curriculum", tmp_path, None)
    assert (first.run_dir, first.run_name, first.backbone.init_from) == (
        str(tmp_path),
        "curriculum",
        job.backbone.init_from,
    )
    later = phase_config(job, "joint", tmp_path, "/runs/c/checkpoint_1")
    assert later.model.init_from == "/runs/c/checkpoint_1" and later.backbone.init_from == ""
    assert job.model.init_from == ""  # the job itself is untouched


def test_protocol_check_and_overrides_name_the_cpf_key():
    job = _job()
    proto = apply_protocol_overrides(
        ProtocolConfig(), ["cpf.curriculum.tasks=['a']", "cpf.curriculum.steps=3"]
    )
    assert proto.curriculum == CurriculumConfig(tasks=["a"], steps=3)
    with pytest.raises(ConfigError, match="cpf.curriculum.nope"):
        apply_protocol_overrides(proto, ["cpf.curriculum.nope=1"])
    with pytest.raises(ConfigError, match="cpf.decoder_finetune.tasks: unknown task 'c'"):
        ProtocolConfig(decoder_finetune=DecoderFinetuneConfig(steps=1, tasks=["c"])).check(job)
    no_teacher = ProtocolConfig(
        curriculum=CurriculumConfig(tasks=["b"], steps=1),
        pseudo_labels=PseudoLabelPhaseConfig(task="a", images="x"),
    )
    with pytest.raises(ConfigError, match="cpf.pseudo_labels.teacher"):
        no_teacher.check(job)
    no_teacher.pseudo_labels.teacher = "/runs/baseline/checkpoint_1"
    no_teacher.check(job)
    with pytest.raises(ConfigError, match=r"cpf.pseudo_labels.confidence must be in \[0, 1\]"):
        PseudoLabelPhaseConfig(confidence=1.5)


def test_fit_phase_skips_finished_and_resumes_interrupted_runs(tmp_path, monkeypatch):
    import gppf.launch.fit

    calls = []
    monkeypatch.setattr(
        gppf.launch.fit, "fit", lambda cfg, resume_from=None: calls.append(resume_from) or {"step": 1}
    )
    cfg = phase_config(_job(), "joint", tmp_path, None)
    run = tmp_path / "joint"
    assert fit_phase(cfg) == {"step": 1} and calls == [None]  # nothing there: a new run
    (run / "checkpoint_2026").mkdir(parents=True)
    fit_phase(cfg)
    assert calls[-1] == str(run)  # checkpoints, no results: continue in place
    (run / "results.json").write_text(json.dumps({"step": 9}))
    assert fit_phase(cfg) == {"step": 9} and len(calls) == 2  # finished: not run again
