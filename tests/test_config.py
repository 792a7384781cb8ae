from __future__ import annotations

import pytest

import task_plugins  # noqa: F401
from gppf.api.registry import TaskRegistryError, build_task, get_task_class, register_task
from gppf.api.task import Task
from gppf.config.base import ConfigError, apply_overrides, from_dict
from gppf.config.job import JobConfig


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"config\.optim\.learning_rate"):
        JobConfig.from_dict({"optim": {"learning_rate": 0.1}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"config\.train\.steps"):
        JobConfig.from_dict({"train": {"steps": "many"}})


def test_overrides_are_typed_and_validated():
    cfg = JobConfig(tasks={"a": {"type": "classification", "batch_size": 4}})
    cfg = apply_overrides(
        cfg, ["optim.lr=0.5", "train.steps=7", "tasks.a.batch_size=9", "backbone.name=resnet18"]
    )
    assert cfg.optim.lr == 0.5 and cfg.train.steps == 7 and cfg.backbone.name == "resnet18"
    assert cfg.tasks["a"]["batch_size"] == 9
    with pytest.raises(ConfigError, match="optim.lrr"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides(cfg, ["optim.lr"])


def test_task_config_unknown_key_names_task():
    with pytest.raises(ConfigError, match=r"tasks\.mytask\.bach_size"):
        build_task("mytask", {"type": "classification", "bach_size": 3})


def test_unknown_task_type():
    with pytest.raises(TaskRegistryError, match="unknown task type 'nope'.*classification.*detection"):
        get_task_class("nope")


def test_duplicate_registration_is_an_error():
    class Other(Task):
        pass

    with pytest.raises(TaskRegistryError, match="already registered"):
        register_task("classification")(Other)


def test_entry_points_expose_bundled_plugins():
    from importlib import metadata

    names = {ep.name for ep in metadata.entry_points(group="gppf.tasks")}
    assert {"classification", "segmentation"} <= names


def test_from_dict_nested():
    from gppf.config.job import OptimConfig

    assert from_dict(OptimConfig, {"lr": 1}).lr == 1.0


def test_task_overrides_may_add_plugin_keys_and_strings_stay_strings():
    cfg = JobConfig(tasks={"a": {"type": "classification"}})
    cfg = apply_overrides(cfg, ["tasks.a.crop_scale_min=0.08", "run_name=2024"])
    assert cfg.tasks["a"]["crop_scale_min"] == 0.08 and cfg.run_name == "2024"
    assert build_task("a", cfg.tasks["a"]).cfg.crop_scale_min == 0.08
    with pytest.raises(ConfigError, match="tasks.a.crop_scale_mn"):
        build_task("a", apply_overrides(cfg, ["tasks.a.crop_scale_mn=1"]).tasks["a"])


def test_train_config_rejects_bad_intervals():
    with pytest.raises(ConfigError, match="log_every"):
        JobConfig.from_dict({"train": {"log_every": 0}})


def test_wildcard_and_nested_task_overrides():
    cfg = JobConfig(tasks={"a": {"type": "classification"}, "d": {"type": "detection"}})
    cfg = apply_overrides(cfg, ["tasks.*.batch_size=2", "tasks.d.head.fpn_channels=16"])
    assert cfg.tasks["a"]["batch_size"] == 2 and cfg.tasks["d"]["batch_size"] == 2
    assert build_task("d", cfg.tasks["d"]).cfg.head.fpn_channels == 16
    with pytest.raises(ConfigError, match=r"tasks\.d\.head\.fpn_channel"):
        build_task("d", apply_overrides(cfg, ["tasks.d.head.fpn_channel=1"]).tasks["d"])
    with pytest.raises(ConfigError, match="unknown key tasks.zz"):
        apply_overrides(cfg, ["tasks.zz.batch_size=1"])
