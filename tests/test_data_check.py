"""The driver's data check runs once per data root and file list, not once per run."""

from __future__ import annotations

import shutil

import pytest

import task_plugins  # noqa: F401
from gppf.config.job import JobConfig
from gppf.launch.fit import resolve
from task_plugins.classification import ClassificationTask
from tests.tasks_for_tests import task_entries


@pytest.fixture
def counted(monkeypatch, tmp_path):
    calls = []
    real = ClassificationTask.check_data

    def check_data(self):
        calls.append(self.name)
        real(self)

    monkeypatch.setattr(ClassificationTask, "check_data", check_data)
    monkeypatch.setenv("GPPF_CACHE_DIR", str(tmp_path / "cache"))
    return calls


def test_check_is_cached_per_files_and_data_config(demo_root, tmp_path, counted):
    root = tmp_path / "data"
    shutil.copytree(demo_root / "classification", root)
    entry = {**task_entries(demo_root)["cls_folder"], "data_root": str(root)}

    def cfg(**kw):
        return JobConfig(tasks={"cls": {**entry, **kw}})

    first = resolve(cfg())
    assert counted == ["cls"] and first.tasks["cls"]["num_classes"] == 4
    again = resolve(cfg(sampling_weight=3.0, loss_weight=0.5))  # what a sweep varies
    assert counted == ["cls"] and again.tasks["cls"]["num_classes"] == 4  # derived value restored
    resolve(cfg(batch_size=4))  # a data setting: checked again
    assert counted == ["cls", "cls"]
    shutil.copy(next((root / "train" / "disc").iterdir()), root / "train" / "disc" / "new.png")
    resolve(cfg())  # a file was added: checked again
    assert counted == ["cls", "cls", "cls"]
    (root / "train" / "disc" / "new.png").unlink()
    resolve(cfg())
    assert len(counted) == 4


def test_cache_survives_the_process_but_not_a_broken_dataset(demo_root, tmp_path, counted):
    from gppf.data import check as data_check

    root = tmp_path / "data"
    shutil.copytree(demo_root / "classification", root)
    cfg = JobConfig(tasks={"cls": {**task_entries(demo_root)["cls_folder"], "data_root": str(root)}})
    resolve(cfg)
    data_check._memory.clear()  # a new process (a Tune trial) reads the cache on disk
    resolve(cfg)
    assert counted == ["cls"]
    shutil.rmtree(root / "val")
    with pytest.raises(FileNotFoundError, match=r"val split directory .* does not exist"):
        resolve(cfg)


def test_a_cached_check_never_carries_loss_or_sampling_weights(demo_root, tmp_path, counted):
    root = tmp_path / "data"
    shutil.copytree(demo_root / "classification", root)
    entry = {**task_entries(demo_root)["cls_folder"], "data_root": str(root)}
    resolve(JobConfig(tasks={"cls": {**entry, "loss_weight": 7.5, "sampling_weight": 7.0}}))
    again = resolve(JobConfig(tasks={"cls": entry}))
    assert counted == ["cls"]
    assert again.tasks["cls"]["loss_weight"] == 1.0 and again.tasks["cls"]["sampling_weight"] == 1.0
