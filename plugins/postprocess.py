"""Post-processing of pooled vectors, fit on the train split: centering, whitening, all-but-the-top.

Raw language-model embeddings are anisotropic (they crowd around a few directions), which makes
every cosine similar; statistics of the train split's vectors can undo part of that. Everything is
computed in float64 and is deterministic (SVD of a symmetric matrix; signs do not matter for
cosine). ``none`` (the default) leaves vectors as they are.
"""

from __future__ import annotations

from dataclasses import dataclass


from framework.errors import LayerprobeError
from framework.hookspecs import hookimpl


@dataclass
class NoOptions:
    """``postprocess=none`` and ``center`` take no options."""


@dataclass
class WhitenOptions:
    dim: int | None = None  # keep the first dim whitened directions (BERT-whitening's k); null = all


@dataclass
class AbttOptions:
    components: int | None = None  # top principal directions removed (D); null = round(width / 100), at least 1


class Identity:
    needs_fit = False

    def fit(self, train_vectors: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        return {}

    def transform(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors


class _Fitted:
    """Holds the train mean; subclasses add their projection."""

    mean: torch.Tensor | None = None

    def _center_fit(self, train_vectors: torch.Tensor) -> torch.Tensor:
        if train_vectors.shape[0] < 2:
            raise LayerprobeError(f"postprocess: the train split gave {train_vectors.shape[0]} sentence(s); fitting needs at least 2")
        x = train_vectors.double()
        self.mean = x.mean(dim=0)
        return x - self.mean

    def _check_fitted(self) -> None:
        if self.mean is None:
            raise RuntimeError("transform() before fit(): the harness fits post-processors on the train split first")


class Center(_Fitted):
    """Subtract the train split's mean vector."""

    def fit(self, train_vectors: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        self._center_fit(train_vectors)
        return {"mean": self.mean}

    def transform(self, vectors: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return (vectors.double() - self.mean).float()


class Whiten(_Fitted):
    """BERT-whitening (Su et al. 2021): x → (x − μ) W, W = U diag(1/√s) from the SVD of the covariance.

    The whitened train vectors have identity covariance; ``dim`` keeps only the directions of the
    ``dim`` largest variances (dimension reduction).
    """

    def __init__(self, options: WhitenOptions):
        import torch

        if options.dim is not None and options.dim < 1:
            raise LayerprobeError(f"postprocess.dim={options.dim} must be a positive number of dimensions (or null for all)")
        self.dim = options.dim
        self.kernel: torch.Tensor | None = None

    def fit(self, train_vectors: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        import torch

        centered = self._center_fit(train_vectors)
        width = centered.shape[1]
        if self.dim is not None and self.dim > width:
            raise LayerprobeError(f"postprocess.dim={self.dim} is more than the vectors' {width} dimensions")
        covariance = centered.T @ centered / (centered.shape[0] - 1)
        u, s, _ = torch.linalg.svd(covariance)
        # Directions without variance in the train split cannot be whitened; they are dropped, not blown up.
        floor = s.max() * torch.finfo(torch.float64).eps * width
        keep = int((s > floor).sum()) if self.dim is None else min(self.dim, int((s > floor).sum()))
        self.kernel = u[:, :keep] / s[:keep].sqrt()
        return {"mean": self.mean, "kernel": self.kernel, "singular_values": s}

    def transform(self, vectors: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return ((vectors.double() - self.mean) @ self.kernel).float()


class AllButTheTop(_Fitted):
    """All-but-the-top (Mu & Viswanath 2018): subtract the mean and the top D principal directions."""

    def __init__(self, options: AbttOptions):
        import torch

        if options.components is not None and options.components < 0:
            raise LayerprobeError(f"postprocess.components={options.components} must be ≥ 0")
        self.components = options.components
        self.directions: torch.Tensor | None = None

    def fit(self, train_vectors: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        import torch

        centered = self._center_fit(train_vectors)
        width = centered.shape[1]
        count = self.components if self.components is not None else max(1, round(width / 100))
        if count >= width:
            raise LayerprobeError(f"postprocess.components={count} leaves nothing of {width}-dimensional vectors")
        _, s, vh = torch.linalg.svd(centered, full_matrices=False)
        self.directions = vh[:count]
        return {"mean": self.mean, "directions": self.directions, "singular_values": s}

    def transform(self, vectors: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        centered = vectors.double() - self.mean
        return (centered - centered @ self.directions.T @ self.directions).float()


@hookimpl
def register_postprocessors(register):
    register("none", lambda options: Identity(), NoOptions)
    register("center", lambda options: Center(), NoOptions)
    register("whiten", Whiten, WhitenOptions)
    register("abtt", AllButTheTop, AbttOptions)
