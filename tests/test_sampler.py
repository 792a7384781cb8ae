from __future__ import annotations

import itertools

import numpy as np
import pytest

from gppf.config.base import ConfigError
from gppf.config.job import SAMPLERS, JobConfig, StageConfig, TrainConfig
from gppf.engine.optim import warmup_cosine
from gppf.engine.sampler import TaskSampler, round_robin_epoch, sample_task, task_schedule
from gppf.engine.stages import StagePlan

W = [4.0, 2.5, 2.5, 4.0, 4.0, 1.0, 2.0, 1.0]


def test_reproducible_from_seed_step_rank():
    a = task_schedule(W, seed=3, rank=1, start=0, stop=200)
    b = [sample_task(W, 3, s, 1) for s in range(200)]
    assert a == b
    assert a != task_schedule(W, seed=3, rank=2, start=0, stop=200)
    assert a != task_schedule(W, seed=4, rank=1, start=0, stop=200)
    # Resuming at step 100 gives the same tail.
    assert task_schedule(W, 3, 1, 100, 200) == a[100:]


def test_frequencies_follow_weights():
    counts = np.bincount([sample_task(W, 0, s, r) for s in range(2000) for r in range(4)], minlength=len(W))
    expected = np.array(W) / sum(W) * 8000
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected) + 5)


def test_per_batch_ablation_runs_one_task_per_step():
    for s in range(50):
        assert len({sample_task(W, 0, s, r, per_batch=True) for r in range(8)}) == 1
    # ...while SIMT runs several tasks in most steps.
    assert sum(len({sample_task(W, 0, s, r) for r in range(8)}) > 1 for s in range(50)) > 40


def test_bad_weights():
    with pytest.raises(ValueError, match="non-negative"):
        sample_task([0.0, 0.0], 0, 0, 0)


def test_warmup_cosine():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)


# -- TaskSampler: train.sampler -----------------------------------------------------------------
NAMES = ["a", "b", "c", "d"]
WEIGHTS = {"a": 4.0, "b": 2.0, "c": 1.0, "d": 1.0}
SIZES = [100, 400, 1000, 300]  # images
BATCH = [4, 8, 10, 2]  # -> 25, 50, 100, 150 batches per round-robin epoch
RANKS, STEPS = 4, 3000


def _plan(stages=(), steps: int = STEPS) -> StagePlan:
    return StagePlan(list(stages), WEIGHTS, steps, warmup_steps=0)


def _sampler(name: str, plan: StagePlan | None = None, sizes=SIZES) -> TaskSampler:
    return TaskSampler(name, plan or _plan(), seed=0, sizes=sizes, batch_sizes=BATCH)


def _counts(sampler: TaskSampler, steps=range(STEPS), world: int = RANKS) -> np.ndarray:
    picks = [sampler.task_at(s, r, world) for s in steps for r in range(world)]
    return np.bincount(picks, minlength=len(NAMES))


def _close(counts: np.ndarray, probs) -> bool:
    expected = np.asarray(probs, dtype=float) / np.sum(probs) * counts.sum()
    return bool(np.all(np.abs(counts - expected) < 5 * np.sqrt(expected) + 5))


def test_simt_and_per_batch_samplers_are_todays_draws():
    w = list(WEIGHTS.values())
    simt, per_batch = _sampler("simt"), _sampler("per_batch")
    for s in range(300):
        for r in range(RANKS):
            assert simt.task_at(s, r, RANKS) == sample_task(w, 0, s, r)
            assert per_batch.task_at(s, r, RANKS) == sample_task(w, 0, s, r, per_batch=True)


@pytest.mark.parametrize(
    "name, probs",
    [("simt", list(WEIGHTS.values())), ("uniform", [1, 1, 1, 1]), ("size", SIZES)],
)
def test_random_samplers_follow_their_distribution(name, probs):
    counts = _counts(_sampler(name))
    assert _close(counts, probs), counts
    # ...and not the others' (the check can fail): weights, uniform and sizes differ enough here.
    others = [p for p in (list(WEIGHTS.values()), [1, 1, 1, 1], SIZES) if p != probs]
    assert not any(_close(counts, p) for p in others)


def test_per_batch_runs_one_task_per_step_with_the_weights():
    sampler = _sampler("per_batch")
    steps = [{sampler.task_at(s, r, RANKS) for r in range(RANKS)} for s in range(STEPS)]
    assert all(len(tasks) == 1 for tasks in steps)
    assert _close(np.bincount([t.pop() for t in steps], minlength=4), list(WEIGHTS.values()))


def test_samplers_keep_to_the_stage_tasks():
    plan = _plan([StageConfig("two", 500, tasks=["b", "d"]), StageConfig("all", 500)], steps=1000)
    for name in SAMPLERS:
        sampler = _sampler(name, plan)
        first = _counts(sampler, range(500))
        assert first[0] == first[2] == 0 and first[1] > 0 and first[3] > 0, (name, first)
        assert np.all(_counts(sampler, range(500, 1000)) > 0), name


def test_uniform_ignores_weights_and_size_ignores_weights_within_the_stage():
    plan = _plan([StageConfig("two", STEPS, tasks={"a": 9.0, "c": 1.0})])
    assert _close(_counts(_sampler("uniform", plan)), [1, 0, 1, 0])
    assert _close(_counts(_sampler("size", plan)), [SIZES[0], 0, SIZES[2], 0])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_round_robin_cycles_equal_sets_in_order(world):
    sizes = [40, 80, 20, 40]  # 10 batches each with BATCH's sizes [4, 8, 2, 4]
    sampler = TaskSampler("round_robin", _plan(), 0, sizes=sizes, batch_sizes=[4, 8, 2, 4])
    cluster = [sampler.task_at(s, r, world) for s in range(60) for r in range(world)]
    assert cluster == [0, 1, 2, 3] * (15 * world)


def test_round_robin_epochs_hold_each_set_n_times_spread_out():
    sampler = _sampler("round_robin")
    n = [s // b for s, b in zip(SIZES, BATCH)]
    length = sum(n)
    epoch = list(sampler.epoch(0))
    assert len(epoch) == length and list(np.bincount(epoch)) == n
    assert all(x != y for x, y in zip(epoch, epoch[1:]))  # no set twice in a row (here avoidable)
    for t in range(4):  # evenly spread: gaps between a set's batches near length / n_t
        at = np.flatnonzero(np.array(epoch) == t)
        assert np.diff(at).max() <= 2 * length / n[t] + 1
    for world in (1, 3, 4):  # every epoch the same sequence, across the cluster
        cluster = [sampler.task_at(s, r, world) for s in range(3 * length // world) for r in range(world)]
        for k in range(len(cluster) // length):
            assert cluster[k * length : (k + 1) * length] == epoch


def _avoidable(counts: tuple[int, ...], prev: int = -1) -> bool:
    """Brute force: can these counts be laid out with no task twice in a row?"""
    if sum(counts) == 0:
        return True
    return any(
        _avoidable(tuple(c - (i == t) for i, c in enumerate(counts)), t)
        for t, c in enumerate(counts)
        if c > 0 and t != prev
    )


def test_round_robin_repeats_a_set_only_when_unavoidable():
    for counts in itertools.product(range(5), repeat=3):
        if sum(counts) == 0:
            continue
        epoch = round_robin_epoch(counts)
        assert list(np.bincount(epoch, minlength=3)) == list(counts)
        repeats = any(x == y for x, y in zip(epoch, epoch[1:]))
        assert repeats == (not _avoidable(counts)), (counts, epoch)


def test_round_robin_never_leaves_the_stage_and_gives_small_sets_a_batch():
    plan = _plan([StageConfig("two", 100, tasks=["a", "c"]), StageConfig("all", 100)], steps=200)
    sampler = TaskSampler("round_robin", plan, 0, sizes=[3, 400, 30, 300], batch_sizes=BATCH)
    first = _counts(sampler, range(100), world=1)
    assert first[1] == first[3] == 0
    assert list(sampler.epoch(0)) == [2, 0, 2, 2]  # a: 3 images < one batch of 4 still gets one


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_resumes_exactly(name):
    plan = _plan([StageConfig("two", 150, tasks=["a", "b"]), StageConfig("all", 150)], steps=300)
    full = [_sampler(name, plan).task_at(s, r, 3) for s in range(300) for r in range(3)]
    fresh = _sampler(name, plan)  # a restarted worker: nothing cached
    assert [fresh.task_at(s, r, 3) for s in range(170, 300) for r in range(3)] == full[170 * 3 :]


def test_sampler_errors():
    with pytest.raises(ValueError, match="unknown task sampler"):
        TaskSampler("random", _plan(), 0)
    with pytest.raises(ValueError, match="training-set size"):
        TaskSampler("size", _plan(), 0)
    with pytest.raises(ValueError, match="'c' has no training images"):
        _sampler("round_robin", sizes=[10, 10, 0, 10])


def test_train_sampler_config_key():
    assert TrainConfig().sampler == "simt"
    with pytest.raises(ConfigError, match=r"config\.train\.sampler must be one of simt, per_batch, .*'rr'"):
        JobConfig.from_dict({"train": {"sampler": "rr"}})
    with pytest.warns(DeprecationWarning, match="per_batch_sampling"):
        old = TrainConfig(per_batch_sampling=True)
    assert old.sampler == "per_batch" and not old.per_batch_sampling
    with pytest.raises(ConfigError, match="per_batch_sampling"):
        TrainConfig(per_batch_sampling=True, sampler="uniform")
