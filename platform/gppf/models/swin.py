"""Swin Transformer trunks (static and lego) that take any input size.

One Swin serves every task of a SIMT run at that task's own input size (GPPF uses 224 / 1024 /
512 px for classification / detection / segmentation), so nothing may be tied to the `img_size`
the timm model was built with. timm's blocks precompute their window, shift and attention mask
for one resolution; the units here keep timm's parameters and names (an exported route loads
into `timm.create_model(name, num_classes=0)` with strict=True) and decide per forward:

- the image is padded to a multiple of the patch size, and each block's input to a multiple of
  its window, then the window is shifted and masked over the padded map, as Swin's own detection
  and segmentation code does it;
- a stage whose map is no larger than the window uses one window of the map's size and no shift
  (timm's rule at build time, applied at run time), so at the build resolution the outputs equal
  timm's; the relative position bias of a smaller window is read from the same table (exact
  offsets, no interpolation).

LayerNorm only: there is no cross-task BN in a Swin trunk, but SIMT and the masked allreduce
apply as to any trunk. As in Swin's own detection and segmentation backbone (its `norm0..norm3`),
every output stage goes through a LayerNorm before the dense heads: timm's final `norm` for the
last stage, and `out_norms` (the trunk's own, shared by all tasks, not part of an exported route)
for stages 1-3.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from gppf.api.task import FeatureInfo
from gppf.api.trunk import Trunk, register_trunk, timm_kwargs
from gppf.config.job import LegoConfig
from gppf.io.checkpoint import LoadReport, load_weights
from gppf.models.lego import LegoBackbone, _models

if TYPE_CHECKING:
    from gppf.config.job import BackboneConfig

Size2 = tuple[int, int]


def window_and_shift(res: Size2, window: Size2, shift: Size2) -> tuple[Size2, Size2]:
    """timm's rule, at run time: a side no longer than the window gets one window of its size
    and no shift."""
    ws = tuple(r if r <= w else w for r, w in zip(res, window))
    sh = tuple(0 if r <= w else s for r, w, s in zip(res, ws, shift))
    return ws, sh  # type: ignore[return-value]


@functools.lru_cache(maxsize=256)
def _relative_index(ws: Size2, table: Size2, device: torch.device) -> torch.Tensor:
    """[N, N] indices into a (2*Th-1)*(2*Tw-1) bias table for a ws window (ws <= table)."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws[0]), torch.arange(ws[1]), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # 2, N, N
    index = (rel[0] + table[0] - 1) * (2 * table[1] - 1) + (rel[1] + table[1] - 1)
    return index.to(device)


@functools.lru_cache(maxsize=256)
def _shift_mask(padded: Size2, ws: Size2, shift: Size2, device: torch.device) -> torch.Tensor:
    """[windows, N, N] additive mask (0 / -100) for shifted windows over a padded map: tokens of
    regions that the cyclic shift brought together do not attend to each other."""
    img = torch.zeros(1, padded[0], padded[1], 1)
    cnt = 0
    for h in ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None)):
            img[:, h[0] : h[1], w[0] : w[1], :] = cnt
            cnt += 1
    win = _partition(img, ws).view(-1, ws[0] * ws[1])
    mask = win[:, None, :] - win[:, :, None]
    return mask.masked_fill(mask != 0, -100.0).to(device)


def _partition(x: torch.Tensor, ws: Size2) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws[0], ws[0], w // ws[1], ws[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws[0], ws[1], c)


def _reverse(windows: torch.Tensor, ws: Size2, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // ws[0], w // ws[1], ws[0], ws[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


class SwinStem(nn.Module):
    """timm's PatchEmbed (its `proj` and `norm`), padding the image to a multiple of the patch."""

    def __init__(self, patch_embed: nn.Module):
        super().__init__()
        self.patch = tuple(patch_embed.patch_size)
        self.proj = patch_embed.proj
        self.norm = patch_embed.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % self.patch[1], 0, (-h) % self.patch[0]))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # NHWC, as timm's Swin


class SwinBlock(nn.Module):
    """timm's SwinTransformerBlock (same children, same state_dict keys), sized at run time."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for name, child in block.named_children():  # norm1, attn, drop_path1, norm2, mlp, drop_path2
            self.add_module(name, child)
        self.table_window: Size2 = tuple(block.attn.window_size)  # the bias table's window
        self.target_shift: Size2 = tuple(block.target_shift_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws, shift = window_and_shift((h, w), self.table_window, self.target_shift)
        y = self.norm1(x)
        y = F.pad(y, (0, 0, 0, (-w) % ws[1], 0, (-h) % ws[0]))
        hp, wp = y.shape[1:3]
        mask = None
        if any(shift):
            y = torch.roll(y, shifts=(-shift[0], -shift[1]), dims=(1, 2))
            mask = _shift_mask((int(hp), int(wp)), ws, shift, y.device)
        out = self._attention(_partition(y, ws).view(-1, ws[0] * ws[1], c), ws, mask)
        y = _reverse(out.view(-1, ws[0], ws[1], c), ws, hp, wp)
        if any(shift):
            y = torch.roll(y, shifts=shift, dims=(1, 2))
        x = x + self.drop_path1(y[:, :h, :w, :])
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def _attention(self, x: torch.Tensor, ws: Size2, mask: torch.Tensor | None) -> torch.Tensor:
        attn = self.attn
        bw, n, c = x.shape
        q, k, v = attn.qkv(x).reshape(bw, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        index = _relative_index(ws, self.table_window, x.device)
        bias = attn.relative_position_bias_table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            bias = (
                (bias[:, None] + mask[None, :, None]).expand(bw // nw, -1, -1, -1, -1).reshape(bw, -1, n, n)
            )
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=attn.attn_drop.p if self.training else 0.0
        )
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(bw, n, -1)))


def dynamic_swin(name: str, model_kwargs: dict | None = None) -> nn.Module:
    """A timm Swin (num_classes=0) whose stem and blocks take any input size."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0, **(model_kwargs or {}))
    model.patch_embed = SwinStem(model.patch_embed)
    for stage in model.layers:
        for i, block in enumerate(stage.blocks):
            stage.blocks[i] = SwinBlock(block)
    return model


def _feature_info(model: nn.Module) -> list[FeatureInfo]:
    return [FeatureInfo(f["num_chs"], f["reduction"]) for f in model.feature_info]


def stage_norms(feature_info: list[FeatureInfo]) -> nn.ModuleList:
    """LayerNorms for every output stage but the last (which has timm's final norm)."""
    return nn.ModuleList(nn.LayerNorm(f.channels) for f in feature_info[:-1])


class StaticSwin(Trunk):
    """One Swin for every task; features are the four stage outputs as NCHW, the last after the
    final norm."""

    def __init__(self, name: str, model_kwargs: dict | None = None, grad_checkpointing: bool = False):
        super().__init__()
        self.timm_name = name
        self.body = dynamic_swin(name, model_kwargs)
        self.body.set_grad_checkpointing(grad_checkpointing)
        self.feature_info = _feature_info(self.body)
        self.out_norms = stage_norms(self.feature_info)
        self.channels_last_layers = True  # timm's Swin blocks compute NHWC

    def forward(self, x: torch.Tensor, task: str | None = None) -> list[torch.Tensor]:
        x = self.body.patch_embed(x)
        feats = []
        for stage in self.body.layers:
            x = stage(x)
            feats.append(x)
        feats = [norm(f) for norm, f in zip(self.out_norms, feats)] + [self.body.norm(feats[-1])]
        return [f.permute(0, 3, 1, 2).contiguous() for f in feats]

    def export(self, task: str | None = None) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.body.state_dict().items()}

    def load_plain(self, state: dict[str, torch.Tensor], source: str) -> LoadReport:
        return load_weights(self.body, state, source)


class LegoSwin(LegoBackbone):
    """Lego Swin: patch embedding (stem), every stage's patch merging and every block, and the
    final norm are lego layers. Features are the four stage outputs as NCHW, the last one after
    the final norm."""

    def __init__(self, name: str, tasks: Sequence[str], cfg: LegoConfig, model_kwargs: dict | None = None):
        models = _models(name, cfg.num_units, model_kwargs, build=dynamic_swin)
        shared = self.shared_set(cfg)
        pick = lambda idx: models[:1] if idx in shared else models  # noqa: E731
        layers = [("patch_embed", [m.patch_embed for m in pick(0)])]
        stage_ends = []
        for s, stage in enumerate(models[0].layers):
            if any(True for _ in stage.downsample.parameters()):
                layers.append((f"layers.{s}.downsample", [m.layers[s].downsample for m in pick(len(layers))]))
            for b in range(len(stage.blocks)):
                layers.append((f"layers.{s}.blocks.{b}", [m.layers[s].blocks[b] for m in pick(len(layers))]))
            stage_ends.append(len(layers) - 1)
        layers.append(("norm", [m.norm for m in pick(len(layers))]))
        stage_ends[-1] = len(layers) - 1
        super().__init__(
            name, layers, stage_ends, _feature_info(models[0]), tasks, cfg, channels_last_features=True
        )
        self.out_norms = stage_norms(self.feature_info)

    def forward(self, x: torch.Tensor, task: str) -> list[torch.Tensor]:
        feats = super().forward(x, task)  # NCHW; the last after timm's final norm (a lego layer)
        normed = [
            norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
            for norm, f in zip(self.out_norms, feats)
        ]
        return normed + feats[-1:]


@register_trunk("static", "swin_transformer")
def _static_swin(cfg: BackboneConfig, task_names: list[str]) -> Trunk:
    return StaticSwin(cfg.name, timm_kwargs(cfg.drop_path_rate, cfg.model_kwargs), cfg.grad_checkpointing)


@register_trunk("lego", "swin_transformer")
def _lego_swin(cfg: BackboneConfig, task_names: list[str]) -> Trunk:
    model = LegoSwin(cfg.name, task_names, cfg.lego, timm_kwargs(cfg.drop_path_rate, cfg.model_kwargs))
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model
