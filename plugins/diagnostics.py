"""Layer diagnostics: what the embedding space looks like, logged beside the scores.

They test the paper's explanations directly: raw language-model embeddings are anisotropic (every
pair of sentences has a high cosine) and deeper layers may concentrate in fewer directions. Each
gets the vectors the cosine compares (pooled, then post-processed), one per distinct sentence of
the evaluated split.
"""

from __future__ import annotations

import numpy as np

from framework.data import SentenceVectors
from framework.hookspecs import hookimpl

ANISOTROPY_PAIRS = 20000


def anisotropy(vectors: SentenceVectors, seed: int) -> float:
    """Mean cosine between the vectors of random distinct sentences (seeded; all pairs when few)."""
    import torch

    x = torch.nn.functional.normalize(vectors.vectors.double(), dim=1)
    n = x.shape[0]
    if n < 2:
        return float("nan")
    if n * (n - 1) // 2 <= ANISOTROPY_PAIRS:
        i, j = torch.triu_indices(n, n, offset=1)
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, n, ANISOTROPY_PAIRS)
        j = (i + rng.integers(1, n, ANISOTROPY_PAIRS)) % n  # never i itself
        i, j = torch.from_numpy(i), torch.from_numpy(j)
    return float((x[i] * x[j]).sum(dim=1).mean())


def _singular_value_distribution(vectors: SentenceVectors) -> np.ndarray:
    """Computed once per set of vectors: spectral entropy and effective rank both read it."""
    import torch

    cached = getattr(vectors, "_singular_value_distribution", None)
    if cached is not None and cached[0] is vectors.vectors:
        return cached[1]
    s = torch.linalg.svdvals(vectors.vectors.double()).numpy()
    distribution = s / s.sum() if s.sum() > 0 else s
    vectors._singular_value_distribution = (vectors.vectors, distribution)
    return distribution


def spectral_entropy(vectors: SentenceVectors, seed: int) -> float:
    """Shannon entropy (nats) of the normalised singular values of the sentences × dims matrix."""
    p = _singular_value_distribution(vectors)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def effective_rank(vectors: SentenceVectors, seed: int) -> float:
    """exp(spectral entropy) (Roy & Vetterli 2007): how many directions the vectors really use."""
    return float(np.exp(spectral_entropy(vectors, seed)))


def mean_norm(vectors: SentenceVectors, seed: int) -> float:
    """Mean L2 norm of the vectors."""
    return float(vectors.vectors.double().norm(dim=1).mean())


@hookimpl
def register_metrics(register):
    register("anisotropy", anisotropy, inputs="vectors")
    register("spectral_entropy", spectral_entropy, inputs="vectors")
    register("effective_rank", effective_rank, inputs="vectors")
    register("mean_norm", mean_norm, inputs="vectors")
