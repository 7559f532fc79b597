"""Attention-weighted pooling with a learnable query (the paper's proposed fix for mean pooling).

weights = softmax(h·q / τ) over a sentence's real tokens; pooled = Σ weights·h. With q = 0 the
weights are uniform, so the untrained pooler *is* mean pooling, exactly; training can only move
away from the paper's baseline where the train split says so.

Objective: a pairwise logistic (RankNet) loss over (paraphrase, non-paraphrase) pairs of train
pairs, on cosine similarity: log(1 + exp(-(cos⁺ - cos⁻)/s)). The evaluation metrics (Spearman
against a binary label, ROC-AUC) only care about the order of cosine scores, and this loss is a
smooth surrogate of exactly that order (it bounds 1 − AUC), where a cosine-regression loss would
also spend capacity on pushing scores to arbitrary targets. The encoder stays frozen; a held-out
slice of the train split picks the epoch (early stopping on its Spearman); the evaluated split is
never seen while fitting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from framework.data import PairTokenStates, TokenStates
from framework.errors import LayerprobeError
from framework.hookspecs import hookimpl

if TYPE_CHECKING:
    import torch


@dataclass
class AttentionOptions:
    train_split: str = "train"  # the split fit sees; never the evaluated one
    train_limit: int | None = None  # first N train pairs (the paper: 1000)
    held_out_fraction: float = 0.1  # of the train pairs, for early stopping
    epochs: int = 100
    patience: int = 10  # epochs without held-out improvement before stopping
    learning_rate: float = 0.01
    comparisons_per_step: int = 4096  # random (paraphrase, non-paraphrase) pairs per step
    scale: float = 0.05  # s in the logistic loss: cosine differences are small
    device: str = "auto"  # where fit trains: auto = the GPU when there is one (the train split's states are moved there), cpu, cuda:N


class AttentionPooler:
    """Two parameters, a query and a log temperature (torch is imported when the pooler is used)."""

    def __init__(self, options: AttentionOptions):
        import torch

        if not 0 < options.held_out_fraction < 1:
            raise LayerprobeError(f"pooler.held_out_fraction={options.held_out_fraction} must lie between 0 and 1")
        self.options = options
        self.query: torch.nn.Parameter | None = None  # sized on first use: the encoder's width
        self.log_temperature = torch.nn.Parameter(torch.zeros(()))

    def _ensure_query(self, width: int, device) -> None:
        import torch

        if self.query is None:
            self.query = torch.nn.Parameter(torch.zeros(width, device=device))

    def parameters(self) -> list:
        return [self.query, self.log_temperature]

    def _state(self) -> tuple:
        return tuple(p.detach().clone() for p in self.parameters())

    def _load(self, state: tuple) -> None:
        import torch

        self.query, self.log_temperature = (torch.nn.Parameter(p.clone()) for p in state)

    def _to(self, device) -> None:
        import torch

        self.query, self.log_temperature = (torch.nn.Parameter(p.detach().to(device)) for p in self.parameters())

    def weights(self, batch: TokenStates) -> torch.Tensor:
        import torch

        self._ensure_query(batch.states.shape[-1], batch.states.device)
        device = batch.states.device
        logits = batch.states.float() @ self.query.to(device) / self.log_temperature.to(device).exp()
        return torch.softmax(logits.masked_fill(~batch.mask, float("-inf")), dim=1)

    def pool(self, batch: TokenStates) -> torch.Tensor:
        import torch

        with torch.no_grad():
            return self._pool(batch)

    def _pool(self, batch: TokenStates) -> torch.Tensor:
        return (self.weights(batch).unsqueeze(-1) * batch.states.float()).sum(dim=1)

    def fit(self, train: PairTokenStates, seed: int) -> dict[str, list[float]]:
        import torch
        from scipy import stats

        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        # Train on the GPU when there is one; the pair sampling runs on the CPU generator, so the
        # seed decides the same steps on either device.
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if self.options.device == "auto" else self.options.device)
        train = PairTokenStates([TokenStates(b.states.to(device), b.mask.to(device), b.sentence_index, b.counts) for b in train.batches],
                                train.a_index, train.b_index, train.labels)
        first = train.batches[0]
        self._ensure_query(first.states.shape[-1], device)
        self._to(device)
        order = torch.randperm(len(train.labels), generator=generator).numpy()
        held = order[: max(2, int(round(len(order) * self.options.held_out_fraction)))]
        fit = order[len(held):]
        labels = torch.as_tensor(train.labels, dtype=torch.float32)
        positive, negative = fit[train.labels[fit] > 0.5], fit[train.labels[fit] <= 0.5]
        if len(positive) == 0 or len(negative) == 0:
            raise LayerprobeError("the train split needs both paraphrases and non-paraphrases to fit pooler=attn")
        optimizer = torch.optim.Adam(self.parameters(), lr=self.options.learning_rate)
        curve = {"loss": [], "heldout_spearman": []}
        best, best_state, stale = -np.inf, self._state(), 0
        on_device = _PairIndex(train, device)  # everything per epoch stays on the training device
        held_index = torch.as_tensor(held, device=device)
        for _ in range(self.options.epochs):
            cosine = self._pair_cosines(train, on_device)
            i = positive[torch.randint(len(positive), (self.options.comparisons_per_step,), generator=generator).numpy()]
            j = negative[torch.randint(len(negative), (self.options.comparisons_per_step,), generator=generator).numpy()]
            i, j = torch.as_tensor(i, device=device), torch.as_tensor(j, device=device)
            loss = torch.nn.functional.softplus(-(cosine[i] - cosine[j]) / self.options.scale).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                held_cosine = self._pair_cosines(train, on_device)[held_index].cpu().numpy()
            rho = float(stats.spearmanr(held_cosine, labels[held].numpy()).statistic)
            curve["loss"].append(float(loss.detach()))
            curve["heldout_spearman"].append(rho)
            if rho > best:
                best, best_state, stale = rho, self._state(), 0
            else:
                stale += 1
                if stale >= self.options.patience:
                    break
        self._load(best_state)
        return curve

    def _pair_cosines(self, train: PairTokenStates, index: "_PairIndex") -> torch.Tensor:
        import torch

        pooled = torch.cat([self._pool(batch) for batch in train.batches])
        vectors = pooled.new_zeros(len(index.order), pooled.shape[1]).index_put((index.order,), pooled)
        return torch.nn.functional.cosine_similarity(vectors[index.a], vectors[index.b], dim=1)

    def learned(self) -> dict[str, torch.Tensor]:
        """What the harness saves as the run's artifact."""
        return {"attention_pooler": {"query": self.query.detach().cpu(), "temperature": self.log_temperature.exp().detach().cpu()}}

    def restore(self, learned: dict[str, dict[str, torch.Tensor]]) -> None:
        """Take back what ``learned`` gave (the harness's cache of fits): the same pooler as after ``fit``."""
        import torch

        state = learned["attention_pooler"]
        self.query = torch.nn.Parameter(state["query"].detach().clone().float())
        self.log_temperature = torch.nn.Parameter(state["temperature"].detach().clone().float().log())


class _PairIndex:
    """The train pairs' sentence positions as tensors on the training device, made once per fit."""

    def __init__(self, train: PairTokenStates, device):
        import torch

        self.order = torch.cat([batch.sentence_index for batch in train.batches]).to(device)
        self.a = torch.as_tensor(train.a_index, device=device)
        self.b = torch.as_tensor(train.b_index, device=device)


@hookimpl
def register_poolers(register):
    register("attn", AttentionPooler, AttentionOptions)
