"""Language-guided adapters on P5 (LV-Adapter §4.2 and its baselines, Table 4 / appendix D.1).

Each task's class names become text features through a frozen text encoder (`gppf.models.text_encoders`):

    prompts   "learned": CoOp contexts, 16 learnable vectors per task before the class name;
              "template": "there is a [CLASS] in the scene."; "ensemble": the mean over templates
    fusion    "l2v": a transformer decoder, queries = P5, keys/values = projected text features,
              whose output replaces P5 (the LV-Adapter);
              "naive": class activation maps (normalised P5 · normalised text) concatenated to P5
              and reduced by a 1x1 conv (DenseCLIP-style naive prompting)

    variant       prompts    fusion
    lv_adapter    learned    l2v
    naive         learned    naive
    template      template   l2v
    ensemble      ensemble   l2v

The text encoder is held outside the module tree: it never enters parameters(), state_dict(),
the optimizer, checkpoints or the workers' broadcasts (90 MB of frozen weights per checkpoint
otherwise), and `_apply` moves it with the model. Text features are computed once per forward
call, i.e. once per step for the step's task, never per image; fixed prompts are computed once.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gppf.config.job import VARIANTS, LanguageConfig
from gppf.models.text_encoders import PLACEHOLDER, TextEncoder, build_text_encoder


class TaskPrompts(nn.Module):
    """One task's class-name prompts: learned CoOp contexts or fixed templates."""

    def __init__(self, encoder: TextEncoder, names: list[str], mode: str, cfg: LanguageConfig):
        super().__init__()
        self.mode = mode
        self.n_classes = len(names)
        if mode == "learned":
            n = cfg.prompt_length
            ids, mask = encoder.tokenize([" ".join([PLACEHOLDER] * n) + f" {name}." for name in names])
            self.ctx = nn.Parameter(torch.randn(n, encoder.embed_dim) * 0.02)  # CoOp's init
            self.slots = slice(1, 1 + n)  # after the start token
        else:
            templates = [cfg.template] if mode == "template" else cfg.templates
            ids, mask = encoder.tokenize([t.format(name) for name in names for t in templates])
            self.n_templates = len(templates)
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self._fixed: torch.Tensor | None = None

    def forward(self, encoder: TextEncoder) -> torch.Tensor:
        """Normalised text features [n_classes, width]."""
        if self.mode == "learned":
            embeds = encoder.embed(self.ids)
            ctx = self.ctx.to(embeds.dtype).expand(embeds.shape[0], -1, -1)
            embeds = torch.cat([embeds[:, : self.slots.start], ctx, embeds[:, self.slots.stop :]], 1)
            return encoder.encode(embeds, self.ids, self.mask)
        if self._fixed is None or self._fixed.device != self.ids.device:
            with torch.no_grad():
                feats = encoder.encode(encoder.embed(self.ids), self.ids, self.mask)
                feats = feats.view(self.n_classes, self.n_templates, -1).mean(1)
            self._fixed = F.normalize(feats, dim=-1)
        return self._fixed


class LanguageAdapter(nn.Module):
    """Replaces P5 by its language-guided version for tasks that have class names; others pass."""

    def __init__(
        self,
        cfg: LanguageConfig,
        class_names: dict[str, list[str]],
        channels: int,
        encoder: TextEncoder | None = None,
    ):
        super().__init__()
        prompts, self.fusion = VARIANTS[cfg.variant]
        encoder = encoder if encoder is not None else build_text_encoder(cfg.text_encoder)
        object.__setattr__(self, "encoder", encoder.freeze())  # outside the module tree (docstring)
        self.prompts = nn.ModuleDict(
            {t: TaskPrompts(encoder, names, prompts, cfg) for t, names in class_names.items() if names}
        )
        self.proj = nn.Linear(encoder.width, channels)
        if self.fusion == "l2v":
            layer = nn.TransformerDecoderLayer(
                channels, cfg.decoder_heads, 4 * channels, dropout=0.1, batch_first=True, norm_first=True
            )
            self.decoder = nn.TransformerDecoder(layer, cfg.decoder_layers)
        else:  # naive: one reducing conv per task (each has its own number of classes)
            self.reduce = nn.ModuleDict(
                {t: nn.Conv2d(channels + p.n_classes, channels, 1) for t, p in self.prompts.items()}
            )

    def _apply(self, fn, recurse: bool = True):
        self.encoder._apply(fn)
        return super()._apply(fn, recurse)

    def text_features(self, task: str) -> torch.Tensor:
        """The task's projected text features [n_classes, channels]."""
        return self.proj(self.prompts[task](self.encoder))

    def forward(self, p5: torch.Tensor, task: str) -> torch.Tensor:
        if task not in self.prompts:
            return p5
        text = self.text_features(task).to(p5.dtype)
        b, c, h, w = p5.shape
        if self.fusion == "naive":
            cam = torch.einsum("bchw,nc->bnhw", F.normalize(p5, dim=1), F.normalize(text, dim=-1))
            return self.reduce[task](torch.cat([p5, cam], 1))
        queries = p5.flatten(2).transpose(1, 2)  # [B, HW, C]
        out = self.decoder(queries, text.unsqueeze(0).expand(b, -1, -1))
        return out.transpose(1, 2).reshape(b, c, h, w)
