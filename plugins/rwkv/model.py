"""RWKV-6 ("Finch", x060) in plain PyTorch, on packed variable-length batches.

Sentences are concatenated into one token axis ``[total_tokens, C]`` with ``cu_seqlens`` marking
where each starts, so no token is ever padding and one sentence cannot affect another. Parameter
names follow BlinkDL's checkpoints (``emb``, ``blocks.{i}.att.*``, ``blocks.{i}.ffn.*``), so a
``.pth`` state dict loads as it is. The residual stream stays in float32; matmuls run in the
weights' dtype (float32 on CPU, bfloat16 on CUDA); the WKV state is float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plugins.rwkv.wkv import wkv6


@dataclass(frozen=True)
class RWKV6Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    ffn_size: int
    attention_size: int | None = None
    head_size: int = 64
    head_size_divisor: int = 8
    layer_norm_eps: float = 1e-5
    mix_rank: int = 32
    decay_rank: int = 64

    @property
    def attention(self) -> int:
        return self.attention_size or self.hidden_size

    @property
    def num_heads(self) -> int:
        return self.attention // self.head_size

    @property
    def group_norm_eps(self) -> float:
        return 1e-5 * self.head_size_divisor**2


class Packed:
    """Where each sentence starts in the packed token axis; token shift needs nothing else."""

    def __init__(self, cu_seqlens: torch.Tensor, total: int):
        self.cu_seqlens = cu_seqlens
        self.is_start = torch.zeros(total, dtype=torch.bool, device=cu_seqlens.device)
        self.is_start[cu_seqlens[:-1]] = True

    def shift(self, x: torch.Tensor) -> torch.Tensor:
        """Each token sees the previous token of its own sentence; the first sees zeros."""
        shifted = torch.cat([x.new_zeros(1, x.shape[1]), x[:-1]])
        return shifted.masked_fill(self.is_start[:, None], 0)


class TimeMix(nn.Module):
    def __init__(self, config: RWKV6Config):
        super().__init__()
        C, A, H = config.hidden_size, config.attention, config.num_heads
        self.config = config
        for name in ("x", "w", "k", "v", "r", "g"):
            setattr(self, f"time_maa_{name}", nn.Parameter(torch.zeros(1, 1, C)))
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * config.mix_rank))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, config.mix_rank, C))
        self.time_decay = nn.Parameter(torch.zeros(1, 1, A))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, config.decay_rank))
        self.time_decay_w2 = nn.Parameter(torch.zeros(config.decay_rank, A))
        self.time_faaaa = nn.Parameter(torch.zeros(H, config.head_size))
        self.receptance = nn.Linear(C, A, bias=False)
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.gate = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)
        self.ln_x = nn.GroupNorm(H, A, eps=config.group_norm_eps)

    def forward(self, xx: torch.Tensor, packed: Packed) -> torch.Tensor:
        T, dtype = xx.shape[0], self.receptance.weight.dtype
        H, N = self.config.num_heads, self.config.head_size
        sx = packed.shift(xx) - xx
        # Data-dependent token mixing: a rank-32 correction per target (w, k, v, r, g).
        xxx = torch.tanh((xx + sx * self.time_maa_x[0]).to(dtype) @ self.time_maa_w1.to(dtype))
        mw, mk, mv, mr, mg = torch.bmm(xxx.view(T, 5, -1).transpose(0, 1), self.time_maa_w2.to(dtype)).float().unbind(0)
        wx = xx + sx * (self.time_maa_w[0] + mw)
        kx = xx + sx * (self.time_maa_k[0] + mk)
        vx = xx + sx * (self.time_maa_v[0] + mv)
        rx = xx + sx * (self.time_maa_r[0] + mr)
        gx = xx + sx * (self.time_maa_g[0] + mg)
        r = self.receptance(rx.to(dtype))
        k = self.key(kx.to(dtype))
        v = self.value(vx.to(dtype))
        g = F.silu(self.gate(gx.to(dtype)))
        # Data-dependent decay in log-log space: decay = exp(-exp(w)), computed in float32.
        w = self.time_decay[0].float() + (torch.tanh(wx.to(dtype) @ self.time_decay_w1.to(dtype)) @ self.time_decay_w2.to(dtype)).float()
        y = wkv6(r.view(T, H, N), k.view(T, H, N), v.view(T, H, N), w.view(T, H, N),
                 self.time_faaaa.float(), packed.cu_seqlens)
        y = F.group_norm(y.view(T, H * N), H, self.ln_x.weight.float(), self.ln_x.bias.float(), self.ln_x.eps)
        return self.output((y * g.float()).to(dtype)).float()


class ChannelMix(nn.Module):
    def __init__(self, config: RWKV6Config):
        super().__init__()
        C, F_ = config.hidden_size, config.ffn_size
        self.time_maa_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, F_, bias=False)
        self.value = nn.Linear(F_, C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)

    def forward(self, xx: torch.Tensor, packed: Packed) -> torch.Tensor:
        dtype = self.key.weight.dtype
        sx = packed.shift(xx) - xx
        k = torch.relu(self.key((xx + sx * self.time_maa_k[0]).to(dtype))) ** 2
        r = torch.sigmoid(self.receptance((xx + sx * self.time_maa_r[0]).to(dtype)))
        return (r * self.value(k)).float()


class Block(nn.Module):
    def __init__(self, config: RWKV6Config, index: int):
        super().__init__()
        if index == 0:
            self.ln0 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.att = TimeMix(config)
        self.ffn = ChannelMix(config)

    def forward(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:
        x = x + self.att(_layer_norm(self.ln1, x), packed)
        return x + self.ffn(_layer_norm(self.ln2, x), packed)


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)


class RWKV6(nn.Module):
    def __init__(self, config: RWKV6Config):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.ln_out = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def num_hidden_states(self) -> int:
        """Entries of Hugging Face's ``hidden_states``: one per block, then one after ``ln_out``."""
        return self.config.num_layers + 1

    def hidden_state(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, index: int) -> torch.Tensor:
        """``hidden_states[index]`` of every packed token (float32), running only the blocks needed."""
        packed = Packed(cu_seqlens, tokens.shape[0])
        x = _layer_norm(self.blocks[0].ln0, self.emb(tokens).float())
        for block in self.blocks[: min(index + 1, self.config.num_layers)]:
            x = block(x, packed)
        if index == self.config.num_layers:
            x = _layer_norm(self.ln_out, x)
        return x

    def logits(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        x = self.hidden_state(tokens, cu_seqlens, self.config.num_layers)
        return self.head(x.to(self.head.weight.dtype)).float()
