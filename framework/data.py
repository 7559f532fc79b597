"""Plain data that flows between the stages: dataset → encoder → pooler → similarity → metrics."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # tensors flow through here; importing torch is left to the stages that compute
    import torch


LABEL_KINDS = ("binary", "graded")


@dataclass
class PairSet:
    """Sentence pairs of one split, and an account of every row that was read.

    ``rows_read == len(self) + sum(skipped.values())``: a row is either here or counted in
    ``skipped`` under its reason. ``notes`` counts rows kept with a caveat (e.g. bytes that were not
    valid UTF-8, decoded with replacement characters). ``label_kind`` is ``binary`` (0/1: paraphrase
    or not) or ``graded`` (a similarity score, e.g. STS-B's 0–5); metrics that need binary labels
    are not computed on graded ones.
    """

    dataset: str
    split: str
    ids: list[str]
    sentences_a: list[str]
    sentences_b: list[str]
    labels: np.ndarray
    rows_read: int
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    source: str = ""
    label_kind: str = "binary"
    # Optional: the split's own library's evaluator (dataset=mteb: MTEB's), given the vectors the
    # cosine compared (``SentenceVectors``); its scores are logged beside layerprobe's metrics.
    evaluator: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.label_kind not in LABEL_KINDS:
            raise ValueError(f"PairSet.label_kind must be one of {LABEL_KINDS}")
        n = len(self.ids)
        if not (len(self.sentences_a) == len(self.sentences_b) == len(self.labels) == n):
            raise ValueError("PairSet columns differ in length")
        if self.rows_read != n + sum(self.skipped.values()):
            raise ValueError("PairSet row accounting does not add up")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def unique_sentences(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Each distinct sentence once, and where sentence a / b of every pair sits in that list."""
        position: dict[str, int] = {}
        for sentence in (*self.sentences_a, *self.sentences_b):
            position.setdefault(sentence, len(position))
        a_index = np.fromiter((position[s] for s in self.sentences_a), dtype=np.int64, count=len(self))
        b_index = np.fromiter((position[s] for s in self.sentences_b), dtype=np.int64, count=len(self))
        return list(position), a_index, b_index

    @cached_property
    def revision(self) -> str:
        """A digest of exactly what is evaluated (ids, both sentences, labels, in order): two runs
        with the same revision scored the same pairs, whatever file or hub copy they came from."""
        import hashlib

        digest = hashlib.sha256(f"{self.dataset}|{self.split}|{len(self)}".encode())
        for pair_id, a, b in zip(self.ids, self.sentences_a, self.sentences_b):
            digest.update(f"\x1f{pair_id}\x1e{a}\x1e{b}".encode("utf-8", "surrogatepass"))
        digest.update(np.ascontiguousarray(self.labels, dtype=np.float64).tobytes())
        return digest.hexdigest()

    def counts(self) -> dict[str, int]:
        """Row accounting, flat, for logging."""
        counts = {"rows_read": self.rows_read, "rows_evaluated": len(self), "rows_skipped": self.rows_skipped}
        counts.update({f"skipped_{reason}": n for reason, n in sorted(self.skipped.items())})
        counts.update({f"rows_{note}": n for note, n in sorted(self.notes.items())})
        return counts


@dataclass
class TokenStates:
    """Token-level vectors of a batch of sentences at one layer, right-padded.

    ``states[i, t]`` is token t of sentence ``sentence_index[i]`` (an index into the list given to
    the encoder); ``mask[i, t]`` is True for real tokens. Every sentence has at least one real
    token (an encoder gives a sentence with nothing to encode one zero vector, and counts it), so
    poolers never divide by zero. ``counts`` are the encoder's tallies for this batch (tokens,
    out-of-vocabulary tokens, empty sentences …), summed by the harness and logged.
    """

    states: torch.Tensor
    mask: torch.Tensor
    sentence_index: torch.Tensor
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.states.dim() != 3 or self.mask.shape != self.states.shape[:2]:
            raise ValueError(f"TokenStates shapes disagree: states {tuple(self.states.shape)}, mask {tuple(self.mask.shape)}")
        if self.sentence_index.shape != (self.states.shape[0],):
            raise ValueError("TokenStates.sentence_index must have one entry per sentence")

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)


@dataclass(frozen=True)
class Layer:
    """The layer a job asked for, as the encoder understood it.

    ``requested`` is the config value (None for encoders without layers), ``index`` the
    non-negative position in the encoder's ``hidden_states`` tuple, ``block`` the 0-based block
    whose output that is (None for entries that are not a block's output, e.g. embeddings).
    """

    requested: int | None = None
    index: int | None = None
    block: int | None = None

    @property
    def label(self) -> str:
        return "-" if self.index is None else str(self.index)


def hidden_state_index(layer, count: int, model: str, meaning: str) -> int:
    """Check a requested ``hidden_states`` position (negative from the end, None = last) → 0..count-1.

    Raises the one-line error that gives the valid range; ``meaning`` explains the range's ends.
    """
    from framework.errors import LayerprobeError

    if layer is None:
        return count - 1
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise LayerprobeError(f"layer={layer!r} is not an integer; use 0..{count - 1} (or negative from the end)")
    index = layer + count if layer < 0 else layer
    if not 0 <= index < count:
        raise LayerprobeError(f"layer={layer} is out of range for this {model}: use 0..{count - 1} ({meaning}) or -{count}..-1")
    return index


@dataclass
class PairTokenStates:
    """Token states of a split's pairs, for poolers that learn (``fit``).

    ``batches`` cover every distinct sentence; pair i is sentences ``a_index[i]`` and
    ``b_index[i]`` of that list; ``labels[i]`` its gold label.
    """

    batches: list[TokenStates]
    a_index: np.ndarray
    b_index: np.ndarray
    labels: np.ndarray


@dataclass
class PairScores:
    """Cosine similarity of every evaluated pair, with what is needed to read it back."""

    pairs: PairSet
    scores: np.ndarray

    def rows(self):
        for i in range(len(self.pairs)):
            p = self.pairs
            yield p.ids[i], p.sentences_a[i], p.sentences_b[i], p.labels[i], float(self.scores[i])


@dataclass
class SentenceVectors:
    """The vectors that the similarity compares (pooled, then post-processed), one per distinct
    sentence of the evaluated split: what metrics that look at the embedding space receive."""

    sentences: list[str]
    vectors: torch.Tensor


@dataclass
class MetricValue:
    """One metric: its value, its bootstrap confidence interval, and any fitted parameters."""

    name: str
    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    extras: dict[str, float] = field(default_factory=dict)
