"""What the harness expects of the objects that plugin factories return."""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence, runtime_checkable

import torch

from framework.data import Layer, PairSet, PairTokenStates, TokenStates


class Dataset(Protocol):
    splits: tuple[str, ...]

    def load(self, split: str, limit: int | None) -> PairSet:
        """The split's pairs (the first ``limit`` rows if given); bad rows counted, not dropped silently."""


class Encoder(Protocol):
    def resolve_layer(self, layer: int | None) -> Layer:
        """Check the requested layer (one-line error giving the valid range) and resolve it."""

    def fingerprint(self) -> str:
        """A short hash of everything that changes the output: weights, config, tokenizer."""

    def encode(self, sentences: Sequence[str], layer: Layer) -> Iterator[TokenStates]:
        """Token states of every sentence, in batches; each sentence exactly once."""


class Pooler(Protocol):
    def pool(self, states: TokenStates) -> torch.Tensor:
        """One vector per sentence of the batch, from its real (unmasked) tokens only."""


@runtime_checkable
class LearnedPooler(Pooler, Protocol):
    def fit(self, train: PairTokenStates, seed: int) -> dict[str, list[float]]:
        """Learn from the train split only; returns the training curve to log."""
