"""Epochs to steps under SIMT (gppf.engine.epochs), against hand-computed figures."""

from __future__ import annotations

import math

import pytest

from gppf.config.base import ConfigError
from gppf.engine.epochs import epochs_to_steps, task_shares

TASKS = {
    "a": {"type": "classification", "sampling_weight": 4.0, "batch_size": 96},
    "b": {"type": "detection", "sampling_weight": 2.5, "batch_size": 8},
    "c": {"type": "segmentation", "sampling_weight": 1.0, "batch_size": 8},
}
SIZES = {"a": 1000, "b": 800, "c": 200}


def test_three_task_simt_config_by_hand():
    # b: p = 2.5 / 7.5 = 1/3; 8 workers x 1/3 x 8 images = 21.33 of b per step; 12 epochs = 450 steps
    assert epochs_to_steps(12, "b", TASKS, SIZES, world=8) == 450
    # c: p = 1 / 7.5; 8 x 2/15 x 8 = 8.533 per step; 6 x 200 / 8.533 = 140.6 -> 141
    assert epochs_to_steps(6, "c", TASKS, SIZES, world=8) == 141
    # a: p = 4 / 7.5; 8 x 8/15 x 96 = 409.6 per step; 1000 / 409.6 = 2.44 -> 3
    assert epochs_to_steps(1, "a", TASKS, SIZES, world=8) == 3
    # Counting every image of a step as b's (the old EPOCH constants' mistake) gives a third.
    assert math.ceil(12 * 800 / (8 * 8)) == 150 != epochs_to_steps(12, "b", TASKS, SIZES, world=8)


def test_a_stage_of_one_task_and_other_samplers():
    assert epochs_to_steps(12, "b", TASKS, SIZES, world=8, stage_tasks=["b"]) == 150  # every worker on b
    assert epochs_to_steps(12, "b", TASKS, SIZES, world=8, stage_tasks={"b": 1.0, "c": 3.0}) == 600
    # uniform: p = 1/3 for c (1/7.5 by weight); 6 x 200 / 21.33 = 56.25 -> 57
    assert epochs_to_steps(6, "c", TASKS, SIZES, world=8, sampler="uniform") == 57
    # size: p = 800 / 2000; 8 x 0.4 x 8 = 25.6 per step; 12 x 800 / 25.6 = 375
    assert epochs_to_steps(12, "b", TASKS, SIZES, world=8, sampler="size") == 375
    # round_robin: batches per epoch 1000 // 96 = 10, 100, 25 -> p = 100 / 135; 202.5 -> 203
    assert epochs_to_steps(12, "b", TASKS, SIZES, world=8, sampler="round_robin") == 203


def test_attached_task_shares_its_hosts_steps():
    tasks = {**TASKS, "aux": {"type": "rotation", "composite_with": "c", "batch_size": 8}}
    shares = task_shares(tasks)
    assert shares["aux"] == shares["c"] == pytest.approx(1 / 7.5)
    assert epochs_to_steps(1, "aux", tasks, {"aux": 200}, world=8) == epochs_to_steps(
        1, "c", TASKS, SIZES, world=8
    )


def test_errors_name_the_task():
    with pytest.raises(ConfigError, match=r"no task 'd'"):
        epochs_to_steps(1, "d", TASKS, SIZES, world=8)
    with pytest.raises(ConfigError, match=r"training-set size of task 'b'"):
        epochs_to_steps(1, "b", TASKS, {"a": 1}, world=8)
    with pytest.raises(ConfigError, match=r"task 'b' is never sampled"):
        epochs_to_steps(1, "b", TASKS, SIZES, world=8, stage_tasks=["a"])
    with pytest.raises(ConfigError, match=r"sampler 'size' needs the training-set size of task 'a'"):
        epochs_to_steps(1, "b", TASKS, {"b": 800}, world=8, sampler="size")


def test_jobs_that_state_epochs_count_them_with_the_helper(tmp_path):
    """LV-Adapter's 1 + 35, VTD's 12 / 12 / 6, GPPF's LVIS stage and IN-1K's 300 epochs, by hand."""
    from gppf.presets import adapt_finetune, cpf, gppf_r50

    det = 69_863  # BDD100K detection's training images
    # adapt_finetune: 8 workers over 3 tasks of batch 8 read 8 x 1/3 x 8 detection images a step
    adapt = adapt_finetune.full_config(str(tmp_path))
    assert [s.steps for s in adapt.stages] == [math.ceil(det / (64 / 3)), math.ceil(35 * det / (64 / 3))]
    # cpf: joint over 3 tasks, curriculum over det + seg, decoder finetuning on detection alone
    job, proto = cpf.full_config(str(tmp_path)), cpf.full_protocol(str(tmp_path))
    assert job.train.steps == math.ceil(12 * det / (64 / 3))
    assert proto.curriculum.steps == math.ceil(12 * det / 32)
    assert proto.decoder_finetune.steps == math.ceil(6 * det / 64)
    # gppf_r50: LVIS's second stage, 12 epochs of its 100,170 images on all 56 workers at batch 8
    r50 = gppf_r50
    tasks = r50.full_config(str(tmp_path)).tasks
    assert r50.lvis_second_stage_steps(tasks, 56) == math.ceil(12 * 100_170 / 448)
