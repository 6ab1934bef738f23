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

    @property
    def vocabulary(self) -> list[str]:
        """The words this encoder knows (without its <pad> and <unk>)."""
        return self.words[2:]

    def unknown_words(self, prompt: str) -> list[str]:
        return [word for word in _words(prompt) if word not in self.index]

    def check_prompt(self, prompt: str) -> list[str]:
        """Refuse a prompt this encoder cannot read: more words than `max_length`, or not one word of the
        vocabulary (it would silently become the unconditional caption). Returns the unknown words of a prompt
        that has some known ones; they read as <unk>, and the caller decides whether to warn."""
        words = _words(prompt)
        self._check_length(prompt, words)
        if not any(word in self.index for word in words):
            raise ValueError(
                f"the prompt {_shown(prompt)} has no word the embedded model knows; its vocabulary: "
                f"{' '.join(self.vocabulary)} (e.g. 'a red circle moving left fast')"
            )
        return [word for word in words if word not in self.index]

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Word ids (B, max_length), padded; unknown words map to <unk> (the pipeline warns about them). The empty
        caption is all padding: the unconditional input."""
        max_length = self.config.max_length
        ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = _words(prompt)
            self._check_length(prompt, words)
            ids[row, : len(words)] = torch.tensor([self.index.get(w, 1) for w in words], dtype=torch.long)
        return ids

    def _check_length(self, prompt: str, words: list[str]) -> None:
        if len(words) > self.config.max_length:
            raise ValueError(f"the prompt {_shown(prompt)} has {len(words)} words; this model reads at most "
                             f"{self.config.max_length} words, so shorten it (e.g. 'a red circle moving left fast')")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids) + self.position[: input_ids.shape[1]]  # (B, L, dim)


def _words(prompt: str) -> list[str]:
    return re.findall(r"[a-z]+", prompt.lower())


def _shown(prompt: str, limit: int = 60) -> str:
    """The prompt quoted for an error message, cut short when long."""
    return repr(prompt if len(prompt) <= limit else prompt[:limit] + "...")
