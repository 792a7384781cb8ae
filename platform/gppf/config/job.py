"""Every config dataclass of a training job, with the choices they accept: the leaf the rest of the
platform builds from. It imports nothing of the implementation, so a config can be read, checked
and diffed without torch, timm or Ray (torchtitan's job_config is the model)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from gppf.config.base import ConfigError, check_choice, from_dict

# -- backbone (gppf.models.backbone, gppf.models.lego) ------------------------------------------
LegoMode = Literal["soft", "hard"]
MODES = get_args(LegoMode)


@dataclass
class LegoConfig:
    num_units: int = 2  # N units per lego layer (GPPF uses 2)
    mode: LegoMode = "soft"  # "soft" or "hard" Gumbel-softmax in training
    shared_stem: bool = True  # the stem is one unit shared by all tasks (GPPF's results)
    shared_layers: tuple[int, ...] = ()  # indices of lego layers that are shared (1 unit)
    tau_start: float = 5.0
    tau_end: float = 0.01
    tau_decay_fraction: float = 0.9  # τ decays linearly over this fraction of steps, then stays
    controller_lr: float = 0.0  # learning rate of the controller logits; 0 = the optimizer's lr

    def __post_init__(self):
        check_choice(self.mode, LegoMode, "config.backbone.lego.mode")
        if self.num_units < 1:
            raise ValueError(f"backbone.lego.num_units must be >= 1, got {self.num_units}")
        if not 0 < self.tau_end <= self.tau_start:
            raise ValueError(
                f"backbone.lego.tau_end must be in (0, tau_start]: the Gumbel temperature decays from "
                f"tau_start to tau_end, got tau_start={self.tau_start}, tau_end={self.tau_end}"
            )
        if not 0 < self.tau_decay_fraction <= 1:
            raise ValueError(
                f"backbone.lego.tau_decay_fraction must be in (0, 1], got {self.tau_decay_fraction}"
            )


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # a timm model
    kind: str = "static"  # "static" (one shared network) or "lego" (per-task routes, GPPF §3.2)
    lego: LegoConfig = field(default_factory=LegoConfig)
    # static timm CNNs: which feature levels (timm's features_only); the default is the last four
    # (res2..res5 of a ResNet, strides 4..32). Swin trunks always give their four stages.
    out_indices: tuple[int, ...] = (-4, -3, -2, -1)
    cross_task_bn: bool = True  # False = GPPF Table 1's "local BN" ablation
    # Recompute activations in backward (GPPF-R50's "Model Checkpoint"): static CNNs per stage,
    # Swin per stage (timm's), lego trunks per lego layer (each block, under soft or hard routes)
    grad_checkpointing: bool = False
    drop_path_rate: float | None = None  # None: the timm model's own default (Swin-T 0.1, ResNets 0)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    # Weights only, from a gppf checkpoint (its backbone) or a plain timm state_dict (an exported
    # route, `python -m gppf.tools.export`); training still starts at step 0 with a fresh optimizer.
    init_from: str = ""


# -- data streams (gppf.data.stream) -------------------------------------------------------------
@dataclass
class StreamConfig:
    prefetch_batches: int = 4  # decoded batches kept ready per task and worker
    min_rows_per_pass: int = 1024  # small datasets repeat epochs inside one pass
    chunk_rows: int = 256  # raw rows (paths, encoded bytes) read and shuffled together
    # Training: each batch is decoded by one Ray task reserving `cpus_per_task` CPUs, and a
    # stream keeps `decode_tasks` of them in flight (the CPUs it can use at once, when the cluster
    # has them). Evaluation's Ray Data tasks reserve `cpus_per_task` too.
    cpus_per_task: float = 1.0
    decode_tasks: int = 4
    stall_warning_s: float = 120.0  # warn (naming the task) when a batch takes longer than this
    preserve_order: bool = True  # Ray Data keeps rows in order (readers without `load`, pseudo-labels)


# -- adapters and language guidance (gppf.models.neck, gppf.models.language) ----------------------
Adapter = Literal["fpn", "pre", "post", "pre_scalar", "pre_vector"]
ADAPTERS = get_args(Adapter)

VARIANTS = {
    "lv_adapter": ("learned", "l2v"),
    "naive": ("learned", "naive"),
    "template": ("template", "l2v"),
    "ensemble": ("ensemble", "l2v"),
}


# CLIP's prompt-ensembling idea with templates that suit scenes rather than object photos.
ENSEMBLE_TEMPLATES = [
    "there is a {} in the scene.",
    "a photo of a {}.",
    "a photo of the {} in the street.",
    "a blurry photo of a {}.",
    "a cropped photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
]


@dataclass
class LanguageConfig:
    variant: str = ""  # "" (off) or one of VARIANTS
    text_encoder: str = "minilm"  # see gppf.models.text_encoders
    prompt_length: int = 16  # CoOp context length (LV-Adapter §5.1)
    decoder_layers: int = 3
    decoder_heads: int = 8
    template: str = "there is a {} in the scene."  # appendix D.1's prompt engineering
    templates: list[str] = field(default_factory=lambda: list(ENSEMBLE_TEMPLATES))

    def __post_init__(self):
        if self.variant and self.variant not in VARIANTS:
            raise ConfigError(
                f"config.model.language.variant must be one of {', '.join(VARIANTS)} (or empty), "
                f"got {self.variant!r}"
            )
        for t in [self.template, *self.templates]:
            if "{}" not in t:
                raise ConfigError(f"config.model.language: template {t!r} has no {{}} for the class name")


# -- multi-task metrics (gppf.engine.mt_metrics) ---------------------------------------------------
@dataclass
class MultiTaskMetricsConfig:
    groups: dict[str, list[str]] = field(default_factory=dict)  # VTDA group -> "task/metric" keys
    sigma: dict[str, float] = field(default_factory=dict)  # key -> σ_t, s_t = 1/ceil(2 σ_t)
    scale: dict[str, float] = field(default_factory=dict)  # key -> s_t itself (wins over sigma)
    baselines: dict[str, float] = field(default_factory=dict)  # key -> single-task score, for Δm
    lower_is_better: list[str] = field(default_factory=list)  # keys of baselines (errors, losses)

    def __post_init__(self):
        where = "config.metrics"
        grouped: set[str] = set()
        for group, keys in self.groups.items():
            if not group or "/" in group:
                raise ConfigError(f"{where}.groups: group name {group!r} must be non-empty, without '/'")
            if not keys:
                raise ConfigError(f"{where}.groups.{group}: a group needs at least one task/metric key")
            for i, key in enumerate(keys):
                split_key(key, f"{where}.groups.{group}[{i}]")
                if key in keys[:i]:
                    raise ConfigError(f"{where}.groups.{group}[{i}]: {key!r} is listed twice")
            grouped.update(keys)
        for name, values in (("sigma", self.sigma), ("scale", self.scale)):
            for key, value in values.items():
                split_key(key, f"{where}.{name}.{key}")
                if key not in grouped:
                    raise ConfigError(f"{where}.{name}.{key}: {key!r} is in none of {where}.groups")
                if not (value > 0 and math.isfinite(value)):
                    raise ConfigError(f"{where}.{name}.{key} must be a positive number, got {value}")
        for key, value in self.baselines.items():
            split_key(key, f"{where}.baselines.{key}")
            # Δm divides by the baseline: a relative change needs a positive one.
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{where}.baselines.{key} must be a positive number, got {value}")
        for i, key in enumerate(self.lower_is_better):
            if key not in self.baselines:
                raise ConfigError(
                    f"{where}.lower_is_better[{i}]: {key!r} has no entry in {where}.baselines "
                    "(the sign applies to Δm only)"
                )
            if key in grouped:
                raise ConfigError(
                    f"{where}.lower_is_better[{i}]: {key!r} is in {where}.groups; VTDA sums "
                    "higher-is-better scores"
                )

    @property
    def enabled(self) -> bool:
        return bool(self.groups or self.baselines)


def split_key(key: str, where: str) -> tuple[str, str]:
    """Splits "task/metric" into (task, metric); a metric name may itself contain a slash."""
    task, sep, metric = key.partition("/")
    if not (task and sep and metric):
        raise ConfigError(f"{where}: {key!r} is not of the form task/metric")
    return task, metric


# -- stages and task sampling (gppf.engine.stages, gppf.engine.sampler) --------------------------
StageSchedule = Literal["global", "stage"]
SCHEDULES = get_args(StageSchedule)


@dataclass
class StageConfig:
    name: str = ""
    steps: int = 0
    # Tasks this stage trains: a list (at their own sampling_weight) or {task: sampling weight};
    # empty = every task of the job at its sampling_weight.
    tasks: dict[str, float] | list[str] = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)  # fnmatch patterns over parameter names
    # fnmatch patterns: when given, every parameter matching none of them is frozen as well
    # (LVIS's second stage trains the final classification layer only)
    train_only: list[str] = field(default_factory=list)
    # {task: {option: value}} handed to the task on entering the stage (Task.enter_stage), e.g.
    # {"lvis": {"class_balanced_beta": 0.999}}; a task with no entry gets {}
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    lr_factor: float = 1.0  # multiplies the learning rate of every parameter group
    # "global": the job's warmup-cosine; "stage": one of its own over this stage
    schedule: StageSchedule = "global"
    warmup_steps: int = 0  # schedule="stage": linear warmup at the start of the stage
    warmup_factor: float = 0.0  # ... starting at lr x this (LV-Adapter: 0.01); 0 = from lr / warmup_steps
    tau_decay: bool = True  # lego τ keeps decaying in this stage; False holds it

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"stage {self.name!r}: steps must be >= 1, got {self.steps}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"stage {self.name!r}: schedule must be one of {SCHEDULES}, got {self.schedule!r}"
            )
        if not 0 <= self.warmup_factor <= 1:
            raise ConfigError(
                f"stage {self.name!r}: warmup_factor must be in [0, 1], got {self.warmup_factor}"
            )
        if self.lr_factor < 0:
            raise ConfigError(f"stage {self.name!r}: lr_factor must be >= 0, got {self.lr_factor}")


Sampler = Literal["simt", "per_batch", "uniform", "size", "round_robin"]
SAMPLERS = get_args(Sampler)


NEEDS_SIZES = ("size", "round_robin")  # samplers that read the tasks' training-set sizes


# -- the job ------------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.16
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_steps: int = 50_000
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    # After the warmup: "cosine" to lr * min_lr_ratio, or "step": x decay_factor at each of
    # decay_steps (GPPF App. D.2's UODB finetuning, VTD's epochs 8 and 11). Stages with
    # schedule="stage" keep a cosine of their own.
    schedule: Literal["cosine", "step"] = "cosine"
    decay_steps: list[int] = field(default_factory=list)
    decay_factor: float = 0.1
    # App. D.2's downstream grid: "weight decay will be divided by learning rate", i.e. the
    # optimizer is given weight_decay / lr (the decay per step is then lr-independent)
    decay_divided_by_lr: bool = False
    # False: norm weights, biases and position-bias tables get no weight decay (Swin's recipe:
    # its own and MMDetection's configs exclude them)
    norm_bias_decay: bool = True

    def __post_init__(self):
        check_choice(self.name, ("sgd", "adamw"), "config.optim.name")
        check_choice(self.schedule, ("cosine", "step"), "config.optim.schedule")
        if self.schedule == "step" and (
            not self.decay_steps or sorted(self.decay_steps) != list(self.decay_steps)
        ):
            raise ConfigError(
                f"config.optim.decay_steps must be increasing steps for schedule 'step', "
                f"got {self.decay_steps}"
            )
        if self.decay_divided_by_lr and self.lr <= 0:
            raise ConfigError("config.optim.decay_divided_by_lr needs optim.lr > 0")


ASYNC_EVAL_FROM_STEPS = 2000  # train.eval_async="auto": runs at least this long evaluate asynchronously


def evaluates_asynchronously(train: TrainConfig, total_steps: int = 0) -> bool:
    """Whether a run evaluates asynchronously (`train.eval_async`); `total_steps`: the run's length
    when its stages set it."""
    long_run = max(total_steps, train.steps) >= ASYNC_EVAL_FROM_STEPS
    return train.eval_async == "on" or (train.eval_async == "auto" and long_run)


@dataclass
class TrainConfig:
    steps: int = 500_000
    seed: int = 0
    # How a worker picks its task at a step (gppf.engine.sampler.TaskSampler): simt, per_batch, uniform,
    # size or round_robin.
    sampler: Sampler = "simt"
    per_batch_sampling: bool = False  # deprecated alias of sampler="per_batch"
    amp: bool = True  # autocast on GPU (ignored on CPU)
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"  # or "float16" (then a GradScaler is used)
    log_every: int = 50
    # Ray Train gets the reports that carry a checkpoint or an evaluation, and the final one
    # (what Tune, callbacks and Result need); log windows go to rank 0's metrics.jsonl,
    # TensorBoard and terminal. A Ray Train report waits until the controller has taken the one
    # before, which it does once per poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s): a report per
    # 1 s step made the demo's steps take 2.1 s. >0: windows also go to Ray Train every this
    # many steps (keep it to several poll intervals).
    report_every: int = 0
    checkpoint_every: int = 5000  # and at the end of every stage and of the run
    keep_checkpoints: int = 2  # Ray Train keeps the newest this many
    # "async": rank 0 writes the checkpoint locally and Ray Train uploads it to run_dir's storage in
    # a background thread while training goes on (registered, so resumable, once uploaded);
    # "sync": every rank waits for the upload at the checkpoint's report
    checkpoint_upload: Literal["async", "sync"] = "async"
    eval_at_start: bool = True
    eval_every: int = 0  # evaluate every this many steps as well (0: at the start and the end only)
    eval_max_batches: int = 0  # per task and worker; 0 = the whole validation split
    # Evaluations during training (step 0's and every eval_every's; not the final one) scored from
    # a snapshot of the weights by Ray actors of their own while training goes on
    # (gppf.engine.async_eval): "on", "off" (every rank stops and scores its share), or "auto":
    # on for runs of ASYNC_EVAL_FROM_STEPS steps or more.
    eval_async: Literal["auto", "on", "off"] = "auto"
    eval_actors: int = 1  # asynchronous evaluators; an evaluation's tasks are spread over them
    # What each evaluator reserves for the whole run: CPUs (it decodes its own batches), a GPU or a
    # fraction of one ({"CPU": 4, "GPU": 0.5}), any custom resource of the cluster
    eval_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    export_routes: bool = False  # lego: write each task's arg-max route (route_<task>.pt) at the end
    bucket_mb: float = 25.0
    # "on": send each gradient bucket during backward as soon as it is final (gppf.dist.allreduce), as
    # DDP does; "off": one exchange after backward. "auto": on with GPUs, where the network and
    # the GPU work side by side; off on CPU, where gloo's reductions compete with backward for the
    # same cores and overlapping measured ~10 % slower (docs/benchmarks.md, P2').
    overlap_allreduce: Literal["auto", "on", "off"] = "auto"
    torch_threads: int = 0  # 0 = cores / workers on this node
    collective_timeout_s: int = 1800  # a hung collective becomes an error after this long
    # Evaluation's collectives (gppf.dist.eval_group): the other ranks wait while rank 0 scores COCO.
    eval_timeout_s: int = 4 * 3600

    def __post_init__(self):
        check_choice(self.sampler, Sampler, "config.train.sampler")
        if self.per_batch_sampling:
            if self.sampler not in ("simt", "per_batch"):
                raise ConfigError(
                    f"config.train.per_batch_sampling=true (deprecated: it means sampler='per_batch') "
                    f"contradicts config.train.sampler={self.sampler!r}; set only config.train.sampler"
                )
            warnings.warn(
                "config.train.per_batch_sampling is deprecated; use config.train.sampler='per_batch'",
                DeprecationWarning,
                stacklevel=2,
            )
            self.sampler, self.per_batch_sampling = "per_batch", False  # saved configs use the new key
        check_choice(self.overlap_allreduce, ("auto", "on", "off"), "config.train.overlap_allreduce")
        check_choice(self.amp_dtype, ("bfloat16", "float16"), "config.train.amp_dtype")
        if self.log_every < 1:
            raise ConfigError(f"config.train.log_every must be >= 1, got {self.log_every}")
        if self.report_every < 0:
            raise ConfigError(
                f"config.train.report_every must be >= 0 (0: no window reports), got {self.report_every}"
            )
        if self.eval_every < 0:
            raise ConfigError(
                f"config.train.eval_every must be >= 0 (0: at the start and end only), got {self.eval_every}"
            )
        check_choice(self.checkpoint_upload, ("async", "sync"), "config.train.checkpoint_upload")
        check_choice(self.eval_async, ("auto", "on", "off"), "config.train.eval_async")
        if self.eval_actors < 1:
            raise ConfigError(f"config.train.eval_actors must be >= 1, got {self.eval_actors}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"config.train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.checkpoint_every < 0:
            raise ConfigError(
                f"config.train.checkpoint_every must be >= 0 (0: at the end), got {self.checkpoint_every}"
            )


@dataclass
class ScalingConfig:
    num_workers: int = 2  # the worker group's size; with min_workers, its maximum
    min_workers: int = 0  # > 0: elastic, Ray Train runs between min_workers and num_workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0  # worker-group restarts (from the last checkpoint) before the job fails
    resize_check_s: float = 60.0  # elastic: how often Ray Train looks for room to grow
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # extra Ray resources

    def __post_init__(self):
        if self.num_workers < 1:
            raise ConfigError(f"config.scaling.num_workers must be >= 1, got {self.num_workers}")
        if not 0 <= self.min_workers <= self.num_workers:
            raise ConfigError(
                f"config.scaling.min_workers must be in [0, num_workers={self.num_workers}], "
                f"got {self.min_workers}"
            )

    def ray_num_workers(self) -> int | tuple[int, int]:
        """Ray Train's `num_workers`: an int, or (min, max) for an elastic worker group."""
        return (self.min_workers, self.num_workers) if self.min_workers else self.num_workers


@dataclass
class FinetuneConfig:
    """Sparse finetuning of a lego checkpoint (gppf.launch.finetune_config, GPPF §3.3)."""

    mode: str = ""  # "" (off), "dynamic" or "fixed"
    checkpoint: str = ""  # a gppf checkpoint of a lego backbone
    route: str = ""  # fixed: a task of the checkpoint whose route to reuse, or a route file (.pt)
    tau_decay_fraction: float = 0.5  # dynamic: τ decays over this fraction of the steps, then stays
    # A task of the checkpoint whose head initialises the head of this job's one task, all but
    # `head_skip` (patterns relative to the head; default: a detector's final predictor): GPPF
    # Table 5 starts UODB's heads from Objects365's, "but we do not load the final prediction layer"
    head_from: str = ""
    head_skip: list[str] = field(default_factory=lambda: ["roi_heads.box_predictor.*"])

    def __post_init__(self):
        if self.mode not in ("", "dynamic", "fixed"):
            raise ConfigError(
                f"config.finetune.mode must be 'dynamic' or 'fixed' (or empty), got {self.mode!r}"
            )


@dataclass
class ModelConfig:
    # Weights only, from a gppf checkpoint (backbone and the heads of tasks with the same name);
    # training starts at step 0 with a fresh optimizer. `--resume` continues a run instead.
    init_from: str = ""
    # With init_from: file keys loaded under other names, as prefix patterns ({"heads.objects365.*":
    # "heads.voc.*"}: a new task's head from another task's, GPPF Table 5), and model keys left as
    # initialised (fnmatch patterns, e.g. "heads.voc.roi_heads.box_predictor.*": "we do not load
    # the final prediction layer"); the load report lists both.
    init_map: dict[str, str] = field(default_factory=dict)
    init_skip: list[str] = field(default_factory=list)
    # A neck shared by every task (gppf.models.neck): "" = none, each detection / segmentation head
    # builds its own FPN (GPPF); "fpn" = one FPN (P2-P5) that all heads read (LV-Adapter).
    neck: Literal["", "fpn"] = ""
    neck_channels: int = 256
    adapter: Adapter = "fpn"  # the neck's design: fpn, pre, post, pre_scalar, pre_vector (gppf.models.neck)
    adapter_init: float = 1e-3  # pre_scalar / pre_vector: the residual gate's initial value
    language: LanguageConfig = field(default_factory=LanguageConfig)  # P5 language adapter

    def __post_init__(self):
        check_choice(self.neck, ("", "fpn"), "config.model.neck")
        check_choice(self.adapter, Adapter, "config.model.adapter")
        if (self.init_map or self.init_skip) and not self.init_from:
            raise ConfigError("config.model.init_map / init_skip act on model.init_from: set it")
        if not self.neck and (self.adapter != "fpn" or self.language.variant):
            raise ConfigError(
                "config.model.adapter / model.language.variant act on the shared neck: set model.neck=fpn"
            )


@dataclass
class JobConfig:
    name: str = "gppf"
    run_dir: str = "~/gppf_runs"  # local path or shared filesystem (all nodes write here)
    run_name: str = (
        ""  # "" = <name>-<date>-<time>; a run's checkpoints, logs and config live in run_dir/run_name
    )
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: StreamConfig = field(default_factory=StreamConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # Phases of the run (gppf.engine.stages); with stages, train.steps is their sum. Empty: one phase.
    stages: list[StageConfig] = field(default_factory=list)
    # Multi-task scores of every evaluation (VTDA, Δm; gppf.engine.mt_metrics). Empty: none.
    metrics: MultiTaskMetricsConfig = field(default_factory=MultiTaskMetricsConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobConfig:
        return from_dict(cls, data, where="config")
