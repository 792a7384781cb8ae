"""The CPF protocol's settings (VTD App. H; gppf.launch.cpf runs the phases) and the pseudo-labelling
they share with `python -m gppf.tools.pseudo_labels`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gppf.config.base import ConfigError

if TYPE_CHECKING:
    from gppf.config.job import JobConfig


@dataclass
class PseudoLabelConfig:
    confidence: float = 0.3  # segmentation: a pixel keeps its class where max softmax >= this
    score: float = 0.5  # detection: boxes (and their masks) scoring >= this are kept
    batch_size: int = 8  # images per inference batch
    actors: int = 2  # Ray Data actor pool size (each holds one copy of the teacher)
    cpus_per_actor: float = 1.0
    use_gpu: bool = False  # one GPU per actor

    def __post_init__(self):
        # Named as jobs/cpf.py spells them; the CLI's flags are the same words.
        for key in ("confidence", "score"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"cpf.pseudo_labels.{key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("batch_size", "actors"):
            if getattr(self, key) < 1:
                raise ConfigError(f"cpf.pseudo_labels.{key} must be >= 1, got {getattr(self, key)}")


PHASES = ("curriculum", "pseudo_labels", "joint", "decoder_finetune")


@dataclass
class CurriculumConfig:
    tasks: list[str] = field(default_factory=list)  # trained first, alone; empty: no curriculum phase
    steps: int = 0


@dataclass
class PseudoLabelPhaseConfig(PseudoLabelConfig):
    task: str = ""  # the task that receives pseudo-labels; "" = no pseudo-label phase
    images: str = ""  # a directory of images to label (e.g. another task's train images)
    teacher: str = ""  # a gppf checkpoint; "" = the curriculum's final one (which must train `task`)


@dataclass
class DecoderFinetuneConfig:
    steps: int = 0  # per task; 0 = no decoder finetuning
    lr_factor: float = 0.1  # VTD App. H.3: the learning rate decreased by a factor of 10
    tasks: list[str] = field(default_factory=list)  # heads to finetune; empty = every task's


@dataclass
class ProtocolConfig:
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    pseudo_labels: PseudoLabelPhaseConfig = field(default_factory=PseudoLabelPhaseConfig)
    decoder_finetune: DecoderFinetuneConfig = field(default_factory=DecoderFinetuneConfig)

    def check(self, job: JobConfig) -> None:
        """Errors name the `cpf.` key; run before any phase starts."""
        known = ", ".join(job.tasks)
        for key, names in (
            ("cpf.curriculum.tasks", self.curriculum.tasks),
            ("cpf.decoder_finetune.tasks", self.decoder_finetune.tasks),
            ("cpf.pseudo_labels.task", [self.pseudo_labels.task] if self.pseudo_labels.task else []),
        ):
            unknown = [t for t in names if t not in job.tasks]
            if unknown:
                raise ConfigError(f"{key}: unknown task {unknown[0]!r}; the job has {known}")
        if self.curriculum.tasks and self.curriculum.steps < 1:
            raise ConfigError("cpf.curriculum.steps must be >= 1 when cpf.curriculum.tasks is set")
        p = self.pseudo_labels
        if p.task:
            if not p.images:
                raise ConfigError("cpf.pseudo_labels.images: the directory of images to label is not set")
            if not p.teacher and p.task not in self.curriculum.tasks:
                raise ConfigError(
                    f"cpf.pseudo_labels.teacher: no teacher checkpoint given, and the curriculum does not "
                    f"train {p.task!r}; give a checkpoint (VTD App. H.2: a single-task baseline) or add the "
                    "task to cpf.curriculum.tasks"
                )
        if self.decoder_finetune.lr_factor < 0 or self.decoder_finetune.steps < 0:
            raise ConfigError("cpf.decoder_finetune.steps and lr_factor must be >= 0")
        if job.finetune.mode:
            raise ConfigError(
                "config.finetune: phases chain through model.init_from; sparse finetuning is not one"
            )
