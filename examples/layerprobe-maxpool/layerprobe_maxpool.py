"""``pooler=maxpool``: per dimension, the mean of the k largest token values (k=1: max pooling).

Install with ``pip install examples/layerprobe-maxpool``; then
``python -m framework -m pooler=mean,maxpool pooler.k=2`` (the option comes from ``Options``).
"""

from dataclasses import dataclass

import torch

from framework.data import TokenStates
from framework.errors import LayerprobeError
from framework.hookspecs import hookimpl


@dataclass
class Options:
    k: int = 1  # how many of the largest values per dimension to average


class TopKMeanPooler:
    def __init__(self, options: Options):
        if options.k < 1:
            raise LayerprobeError(f"pooler.k={options.k} must be at least 1")
        self.k = options.k

    def pool(self, batch: TokenStates) -> torch.Tensor:
        padded = batch.states.float().masked_fill(~batch.mask.unsqueeze(-1), float("-inf"))
        k = min(self.k, padded.shape[1])
        top = padded.topk(k, dim=1).values  # [batch, k, dim]; -inf where a sentence has < k tokens
        real = torch.isfinite(top)
        return torch.where(real, top, 0.0).sum(dim=1) / real.sum(dim=1).clamp_min(1)


@hookimpl
def register_poolers(register):
    register("maxpool", TopKMeanPooler, Options)
