"""A word-level text encoder for the procedural domain: one learned vector per word of the domain's vocabulary,
plus a learned position vector. It saves and loads like any diffusers model (config.json + safetensors)."""

from __future__ import annotations

import logging
import re

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

logger = logging.getLogger(__name__)

PAD, UNKNOWN = "<pad>", "<unk>"


class VocabTextEncoder(ModelMixin, ConfigMixin):
    """Captions -> (B, max_length, dim) embeddings. The empty caption (all padding) is the unconditional input."""

    @register_to_config
    def __init__(self, vocabulary: list[str], dim: int = 64, max_length: int = 8) -> None:
        super().__init__()
        self.words = [PAD, UNKNOWN, *vocabulary]
        self.index = {word: i for i, word in enumerate(self.words)}
        self.embedding = nn.Embedding(len(self.words), dim)
        self.position = nn.Parameter(torch.zeros(max_length, dim))
        nn.init.normal_(self.embedding.weight, std=0.5)
        nn.init.normal_(self.position, std=0.1)

    def unknown_words(self, prompt: str) -> list[str]:
        return [word for word in _words(prompt) if word not in self.index]

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Word ids (B, max_length), padded; unknown words map to <unk> (the pipeline warns about them)."""
        max_length = self.config.max_length
        ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = _words(prompt)
            if len(words) > max_length:
                raise ValueError(f"prompt {prompt!r} has {len(words)} words; this encoder reads at most {max_length}")
            ids[row, : len(words)] = torch.tensor([self.index.get(w, 1) for w in words], dtype=torch.long)
        return ids

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids) + self.position[: input_ids.shape[1]]  # (B, L, dim)


def _words(prompt: str) -> list[str]:
    return re.findall(r"[a-z]+", prompt.lower())
