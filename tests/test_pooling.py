"""Poolers pool real tokens only: padding never changes a pooled vector."""

import torch

from framework.data import TokenStates
from plugins.pooling import LastPooler, MaxPooler, MeanPooler


def batch():
    states = torch.tensor([
        [[1.0, -1.0], [3.0, 5.0], [100.0, 100.0]],  # 2 real tokens + padding
        [[-2.0, 4.0], [0.0, 0.0], [-9.0, 9.0]],  # 3 real tokens
    ])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    return TokenStates(states, mask, torch.tensor([0, 1]))


def test_mean_ignores_padding():
    assert torch.allclose(MeanPooler().pool(batch()), torch.tensor([[2.0, 2.0], [-11 / 3, 13 / 3]]))


def test_max_ignores_padding():
    assert torch.equal(MaxPooler().pool(batch()), torch.tensor([[3.0, 5.0], [0.0, 9.0]]))


def test_last_takes_the_last_real_token():
    assert torch.equal(LastPooler().pool(batch()), torch.tensor([[3.0, 5.0], [-9.0, 9.0]]))
