"""The fields every task's config has; a plugin's config subclasses TaskConfig (gppf.api.task has the
Task contract that uses it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TaskConfig:
    """Fields every task has. Plugins subclass this and add their own."""

    data_root: str = ""
    batch_size: int = 8  # per worker, per step
    sampling_weight: float = 1.0  # relative probability that a worker picks this task at a step
    loss_weight: float = 1.0  # w_t in GPPF's objective
    input_size: int = 224
    # CompL's composite mode (gppf.engine.composite): run this task only together with the named task,
    # in the same trunk forward, never sampled on its own; its loss_weight is λ.
    composite_with: str = ""
    # Class names, for language-guided adapters (gppf.models.language); empty: the plugin's own (COCO
    # categories, ImageFolder folders) or "class <i>".
    class_names: list[str] = field(default_factory=list)
    # Train on a fixed subset of the train split (gppf.data.subsets): this fraction of its units,
    # the same on every rank and run for one label_seed; 1.0 = everything. Never the val split.
    label_fraction: float = 1.0
    label_seed: int = 0
    # Directories in data_root's layout whose train split trains with this task's own (pseudo-labels
    # written by gppf.tools.pseudo_labels); their validation splits are not read.
    extra_train_roots: list[str] = field(default_factory=list)
    # Evaluate this task every this many steps instead of train.eval_every (0: follow it), so
    # that a large validation split (Open Images' 41k images) is not scored as often as VOC's.
    eval_every: int = 0
