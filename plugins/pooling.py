"""Parameter-free poolers: masked mean, masked max, the last real token, and the first token (CLS)."""

from __future__ import annotations

from dataclasses import dataclass


from framework.data import TokenStates
from framework.hookspecs import hookimpl


@dataclass
class NoOptions:
    """These poolers take no options."""


class MeanPooler:
    """Average of the real tokens' states (the paper's pooling)."""

    def pool(self, batch: TokenStates) -> torch.Tensor:
        mask = batch.mask.unsqueeze(-1).to(batch.states.dtype)
        return (batch.states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)


class MaxPooler:
    """Element-wise maximum over the real tokens' states."""

    def pool(self, batch: TokenStates) -> torch.Tensor:
        padded = batch.states.masked_fill(~batch.mask.unsqueeze(-1), float("-inf"))
        return padded.amax(dim=1)


class LastPooler:
    """The state of the last real token: for an RNN, the summary of the whole sentence."""

    def pool(self, batch: TokenStates) -> torch.Tensor:
        import torch

        positions = torch.arange(batch.mask.shape[1], device=batch.mask.device)
        last = torch.where(batch.mask, positions, -1).amax(dim=1)
        return batch.states[torch.arange(len(last), device=last.device), last]


class ClsPooler:
    """The state of the first token: BERT's [CLS] (``hidden_states[k][:, 0]``), whether or not the
    encoder pools special tokens; for models without one, the first token of the sentence."""

    def pool(self, batch: TokenStates) -> torch.Tensor:
        return batch.states[:, 0]


@hookimpl
def register_poolers(register):
    register("mean", lambda options: MeanPooler(), NoOptions)
    register("max", lambda options: MaxPooler(), NoOptions)
    register("last", lambda options: LastPooler(), NoOptions)
    register("cls", lambda options: ClsPooler(), NoOptions)
