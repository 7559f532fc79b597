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


def _shift(xx: torch.Tensor, is_start: torch.Tensor) -> torch.Tensor:
    """Each token sees the previous token of its own sentence; the first sees zeros."""
    shifted = torch.cat([xx.new_zeros(1, xx.shape[1]), xx[:-1]])
    return shifted.masked_fill(is_start[:, None], 0)


def _time_mix_inputs(xx, is_start, maa_x, maa_wkvrg, mix_w1, mix_w2,
                     receptance, key, value, gate, decay, decay_w1, decay_w2):
    """Token shift, data-dependent mixing, the four projections and the decay, from ln1(x)."""
    T, dtype = xx.shape[0], receptance.dtype
    sx = _shift(xx, is_start) - xx
    lora = torch.tanh((xx + sx * maa_x).to(dtype) @ mix_w1)
    # A rank-32 correction of the mixing coefficients per target (w, k, v, r, g).
    m = torch.bmm(lora.view(T, 5, -1).transpose(0, 1), mix_w2).float()
    wx, kx, vx, rx, gx = (xx + sx * (maa_wkvrg[:, None, :] + m)).to(dtype).unbind(0)
    r, k, v = rx @ receptance.t(), kx @ key.t(), vx @ value.t()
    g = F.silu(gx @ gate.t())
    # Data-dependent decay, given in log-log space: log d = -exp(w), in float32.
    w = decay + (torch.tanh(wx @ decay_w1) @ decay_w2).float()
    return r, k, v, -torch.exp(w), g


def wkv_from_log_decay(r, k, v, log_decay, u, cu_seqlens) -> torch.Tensor:
    """The eager model's WKV (``plugins.rwkv.wkv.wkv6``, differentiable), given log d = -exp(w)."""
    return wkv6(r, k, v, torch.exp(log_decay), u, cu_seqlens)


def _time_mix_output(x, y, g, output):
    """``y`` is the group-normed WKV output: gate it, project, add to the residual stream."""
    return x + ((y * g.float()).to(output.dtype) @ output.t()).float()


def _channel_mix(x, xx, is_start, maa_k, maa_r, key, value, receptance):
    """``x + ffn(xx)`` with ``xx = ln2(x)``."""
    dtype = key.dtype
    sx = _shift(xx, is_start) - xx
    k = torch.relu((xx + sx * maa_k).to(dtype) @ key.t()) ** 2
    r = torch.sigmoid((xx + sx * maa_r).to(dtype) @ receptance.t())
    return x + (r * (k @ value.t())).float()


class TimeMix(nn.Module):
    def __init__(self, config: RWKV6Config, device=None):
        super().__init__()
        C, A, H = config.hidden_size, config.attention, config.num_heads
        self.config = config
        for name in ("x", "w", "k", "v", "r", "g"):
            setattr(self, f"time_maa_{name}", nn.Parameter(torch.zeros(1, 1, C, device=device)))
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * config.mix_rank, device=device))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, config.mix_rank, C, device=device))
        self.time_decay = nn.Parameter(torch.zeros(1, 1, A, device=device))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, config.decay_rank, device=device))
        self.time_decay_w2 = nn.Parameter(torch.zeros(config.decay_rank, A, device=device))
        self.time_faaaa = nn.Parameter(torch.zeros(H, config.head_size, device=device))
        self.receptance = nn.Linear(C, A, bias=False, device=device)
        self.key = nn.Linear(C, A, bias=False, device=device)
        self.value = nn.Linear(C, A, bias=False, device=device)
        self.gate = nn.Linear(C, A, bias=False, device=device)
        self.output = nn.Linear(A, C, bias=False, device=device)
        self.ln_x = nn.GroupNorm(H, A, eps=config.group_norm_eps, device=device)
        # (r, k, v, log decay, u, cu_seqlens) → float32 output; training on CUDA swaps in a kernel with a backward
        self.wkv = wkv_from_log_decay

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm, packed: Packed) -> torch.Tensor:
        """``x + att(ln(x))``: the residual add is fused into the output projection's epilogue."""
        T, H, N = x.shape[0], self.config.num_heads, self.config.head_size
        maa_wkvrg = torch.cat([self.time_maa_w[0], self.time_maa_k[0], self.time_maa_v[0], self.time_maa_r[0], self.time_maa_g[0]])
        xx = _layer_norm(norm, x)
        r, k, v, log_d, g = _time_mix_inputs(xx, packed.is_start, self.time_maa_x[0, 0], maa_wkvrg,
                                         self.time_maa_w1, self.time_maa_w2,
                                         self.receptance.weight, self.key.weight, self.value.weight, self.gate.weight,
                                         self.time_decay[0, 0], self.time_decay_w1, self.time_decay_w2)
        y = self.wkv(r.view(T, H, N), k.view(T, H, N), v.view(T, H, N), log_d.view(T, H, N), self.time_faaaa, packed.cu_seqlens)
        y = F.group_norm(y.view(T, H * N), H, self.ln_x.weight, self.ln_x.bias, self.ln_x.eps)
        return _time_mix_output(x, y, g, self.output.weight)


class ChannelMix(nn.Module):
    def __init__(self, config: RWKV6Config, device=None):
        super().__init__()
        C, F_ = config.hidden_size, config.ffn_size
        self.time_maa_k = nn.Parameter(torch.zeros(1, 1, C, device=device))
        self.time_maa_r = nn.Parameter(torch.zeros(1, 1, C, device=device))
        self.key = nn.Linear(C, F_, bias=False, device=device)
        self.value = nn.Linear(F_, C, bias=False, device=device)
        self.receptance = nn.Linear(C, C, bias=False, device=device)

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm, packed: Packed) -> torch.Tensor:
        """``x + ffn(ln(x))``: ReLU² key, sigmoid receptance."""
        return _channel_mix(x, _layer_norm(norm, x), packed.is_start, self.time_maa_k[0, 0],
                     self.time_maa_r[0, 0], self.key.weight, self.value.weight, self.receptance.weight)


class Block(nn.Module):
    def __init__(self, config: RWKV6Config, index: int, device=None):
        super().__init__()
        if index == 0:
            self.ln0 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device)
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device)
        self.att = TimeMix(config, device)
        self.ffn = ChannelMix(config, device)

    def forward(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:
        return self.ffn(self.att(x, self.ln1, packed), self.ln2, packed)


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class PackedStack(nn.Module):
    """What RWKV-6 and RWKV-7 share: embedding (+ ``ln0``), a stack of blocks, ``ln_out``, head."""

    def __init__(self, config, block, device: str | torch.device | None = None):
        """``device="meta"`` builds the structure without memory, for loading weights into."""
        super().__init__()
        self.config = config
        self.fused = False  # CUDA: the Triton kernels of plugins.rwkv.fused between matmuls (RWKV-6 only)
        self.emb = nn.Embedding(config.vocab_size, config.hidden_size,  # _weight: no random init (on meta it imports torch._dynamo)
                                _weight=torch.empty(config.vocab_size, config.hidden_size, device=device))
        self.blocks = nn.ModuleList(block(config, i, device) for i in range(config.num_layers))
        self.ln_out = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device)

    @property
    def num_hidden_states(self) -> int:
        """Entries of Hugging Face's ``hidden_states``: one per block, then one after ``ln_out``."""
        return self.config.num_layers + 1

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embeddings after ``ln0`` (float32): what block 0 reads."""
        return _layer_norm(self.blocks[0].ln0, self.emb(tokens).float())

    def logits(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        x = self.hidden_state(tokens, cu_seqlens, self.config.num_layers)
        return self.head(x.to(self.head.weight.dtype)).float()


class RWKV6(PackedStack):
    def __init__(self, config: RWKV6Config, device: str | torch.device | None = None):
        super().__init__(config, Block, device)

    def hidden_state(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, index: int) -> torch.Tensor:
        """``hidden_states[index]`` of every packed token (float32), running only the blocks needed."""
        return self.continue_from(self.embed(tokens), cu_seqlens, -1, index)

    def continue_from(self, x: torch.Tensor, cu_seqlens: torch.Tensor, after: int, index: int) -> torch.Tensor:
        """``hidden_states[index]`` from ``x`` = ``hidden_states[after]`` (-1: the embeddings after ln0)."""
        packed = Packed(cu_seqlens, x.shape[0])
        blocks = self.blocks[after + 1: min(index + 1, self.config.num_layers)]
        final_norm = self.ln_out if index == self.config.num_layers else None
        if self.fused and x.is_cuda:
            from plugins.rwkv.fused import run_blocks

            return run_blocks(blocks, x, packed.is_start, cu_seqlens, final_norm)
        for block in blocks:
            x = block(x, packed)
        return x if final_norm is None else _layer_norm(final_norm, x)
