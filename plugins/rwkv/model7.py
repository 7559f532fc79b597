"""RWKV-7 ("Goose", x070) in plain PyTorch, on packed variable-length batches.

The same conventions as ``plugins.rwkv.model`` (RWKV-6): sentences back to back on one token axis
with ``cu_seqlens``, BlinkDL's parameter names (``blocks.{i}.att.x_r``, ``w0``/``w1``/``w2``, …) so
a ``.pth`` state dict loads as it is, the residual stream in float32, matmuls in the weights' dtype.

Per block, from ``xx = ln1(x)`` and its token shift (as BlinkDL's ``RWKV_x070_TMix_seq``):
``r, k, v`` projections; decay ``w = exp(-e^-0.5 · σ(w0 + tanh(xw W1) W2))``; in-context learning
rate ``a = σ(a0 + xa A1 A2)``; gate ``g = σ(xg G1) G2``; the removal key ``kk = normalize(k ⊙ k_k)``
per head; ``k ← k ⊙ (1 + (a − 1) ⊙ k_a)``; the value residual: block 0's ``v`` is ``v_first``, later
blocks mix towards it by ``σ(v0 + xv V1 V2)``. The state of each head (value × key) follows the
generalised delta rule ``S ← S diag(w) − (S kk)(kk ⊙ a)ᵀ + v kᵀ`` and the output is ``S r``, group-
normed per head (eps 64e-5), plus ``(Σ r ⊙ k ⊙ r_k) v`` per head, gated by ``g``, projected. The
channel mix is ``relu(shift-mixed x · K)² · V``; the DeepEmbed variant scales that by a per-token
``(x s1) · S_emb[token] · s2 + s0`` (``S_emb`` = ``s_emb`` + ``ln0(emb) · s_emb_x``, merged at load).

Layer k is the residual stream after block k; the last entry is after ``ln_out`` (as for RWKV-6).
Deeper layers cannot continue from a cached shallower one: every block reads block 0's ``v_first``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plugins.rwkv.model import PackedStack, _layer_norm  # the shared embedding, stack, ln_out and head

DECAY_SCALE = 0.6065306597126334  # e^-0.5: log w = -e^-0.5 · σ(·), so every decay lies in (0.545, 1)
DEEP_EMBED_RANK = 32  # DeepEmbed: a 32 × 32 matrix per token


@dataclass(frozen=True)
class RWKV7Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    ffn_size: int
    head_size: int = 64
    decay_rank: int = 64
    a_rank: int = 64
    v_rank: int = 32
    gate_rank: int = 128
    deep_embed: bool = False
    layer_norm_eps: float = 1e-5
    version: int = 7

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size

    @property
    def group_norm_eps(self) -> float:
        return 64e-5


def _shift(xx: torch.Tensor, is_start: torch.Tensor) -> torch.Tensor:
    shifted = torch.cat([xx.new_zeros(1, xx.shape[1]), xx[:-1]])
    return shifted.masked_fill(is_start[:, None], 0)


STATE_GROUP_BYTES = 2**21  # sentences whose states together fit in ~2 MiB (a core's cache) advance together


def wkv7(r, log_w, k, v, a, b, cu_seqlens) -> torch.Tensor:
    """The generalised delta rule on packed tokens ``[T, H, N]`` (float32), a token at a time over
    groups of sentences: ``S ← S diag(w) + (S a) bᵀ + v kᵀ``, out = ``S r``; ``a`` = −kk, ``b`` = kk ⊙ a.

    A group's states stay in the CPU's cache while it steps (a whole pack's would stream through
    memory at every token); without gradients each step updates the state in place. Padding
    beyond a sentence's end has w = 1 and a = b = k = v = 0: it changes nothing."""
    T, H, N = r.shape
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    B, width = len(lengths), int(lengths.max())
    sentence = torch.repeat_interleave(torch.arange(B, device=r.device), lengths)
    position = torch.arange(T, device=r.device) - cu_seqlens[:-1][sentence]

    def padded(x):  # [width, B, H, N]: one token of every sentence per step
        out = x.new_zeros(width, B, H, N, dtype=torch.float32)
        out[position, sentence] = x.float()
        return out

    R, K, V, A, Bv = (padded(t) for t in (r, k, v, a, b))
    W = padded(log_w).exp()  # padding's zero log decay: w = 1
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (r, log_w, k, v, a, b))
    group = B if r.is_cuda or grad else max(1, STATE_GROUP_BYTES // (H * N * N * 4))
    host_lengths = lengths.tolist()
    outs = []
    for first in range(0, B, group):
        rows = slice(first, min(first + group, B))
        longest = max(host_lengths[rows])
        G = rows.stop - rows.start
        state = r.new_zeros(G, H, N, N, dtype=torch.float32)
        steps = []
        for t in range(longest):
            w_t, a_t, b_t, v_t, k_t = W[t, rows], A[t, rows], Bv[t, rows], V[t, rows], K[t, rows]
            if grad:
                state = state * w_t[:, :, None, :] + (state @ a_t[..., None]) @ b_t[:, :, None, :] + v_t[..., None] @ k_t[:, :, None, :]
            else:
                removed = state @ a_t[..., None]  # from the state before this token's decay
                flat = state.mul_(w_t[:, :, None, :]).view(G * H, N, N)
                flat.baddbmm_(removed.view(G * H, N, 1), b_t.reshape(G * H, 1, N))
                flat.baddbmm_(v_t.reshape(G * H, N, 1), k_t.reshape(G * H, 1, N))
            steps.append((state @ R[t, rows][..., None]).squeeze(-1))
        part = torch.stack(steps)
        if longest < width:
            part = torch.cat([part, part.new_zeros(width - longest, *part.shape[1:])])
        outs.append(part)
    return torch.cat(outs, dim=1)[position, sentence]


class TimeMix7(nn.Module):
    def __init__(self, config: RWKV7Config, index: int, device=None):
        super().__init__()
        C, H, N = config.hidden_size, config.num_heads, config.head_size
        self.config, self.index = config, index

        def vector(*shape):
            return nn.Parameter(torch.zeros(*shape, device=device))

        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            setattr(self, name, vector(1, 1, C))
        self.w1, self.w2 = vector(C, config.decay_rank), vector(config.decay_rank, C)
        self.a1, self.a2 = vector(C, config.a_rank), vector(config.a_rank, C)
        if index > 0:  # block 0's v is v_first: no value residual there
            self.v0, self.v1, self.v2 = vector(1, 1, C), vector(C, config.v_rank), vector(config.v_rank, C)
        self.g1, self.g2 = vector(C, config.gate_rank), vector(config.gate_rank, C)
        self.r_k = vector(H, N)
        self.receptance = nn.Linear(C, C, bias=False, device=device)
        self.key = nn.Linear(C, C, bias=False, device=device)
        self.value = nn.Linear(C, C, bias=False, device=device)
        self.output = nn.Linear(C, C, bias=False, device=device)
        self.ln_x = nn.GroupNorm(H, C, eps=config.group_norm_eps, device=device)
        self.wkv = wkv7  # (r, log w, k, v, -kk, kk·a, cu_seqlens) → float32; on CUDA fla's kernel replaces it

    def forward(self, x, xx, is_start, cu_seqlens, v_first):
        """``x + att(xx)`` with ``xx = ln1(x)``; returns it and ``v_first`` (block 0 sets it)."""
        T, H, N = x.shape[0], self.config.num_heads, self.config.head_size
        dtype = self.receptance.weight.dtype
        sx = _shift(xx, is_start) - xx

        def mixed(name):
            return (xx + sx * getattr(self, name)[0, 0]).to(dtype)

        xr, xw, xk, xv, xa, xg = (mixed(n) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))
        r = (xr @ self.receptance.weight.t()).float()
        k = (xk @ self.key.weight.t()).float()
        v = (xv @ self.value.weight.t()).float()
        log_w = -DECAY_SCALE * torch.sigmoid(self.w0[0, 0] + (torch.tanh(xw @ self.w1) @ self.w2).float())
        a = torch.sigmoid(self.a0[0, 0] + ((xa @ self.a1) @ self.a2).float())
        g = (torch.sigmoid(xg @ self.g1) @ self.g2).float()
        kk = F.normalize((k * self.k_k[0, 0]).view(T, H, N), dim=-1, p=2.0).view(T, H * N)
        k = k * (1 + (a - 1) * self.k_a[0, 0])
        if self.index == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0[0, 0] + ((xv @ self.v1) @ self.v2).float())
        shape = (T, H, N)
        y = self.wkv(r.view(shape), log_w.view(shape), k.view(shape), v.view(shape), (-kk).view(shape), (kk * a).view(shape),
                     cu_seqlens)
        y = F.group_norm(y.reshape(T, H * N), H, self.ln_x.weight, self.ln_x.bias, self.ln_x.eps)
        y = y + ((r * k * self.r_k.view(-1)).view(T, H, N).sum(-1, keepdim=True) * v.view(T, H, N)).view(T, H * N)
        return x + ((y * g).to(dtype) @ self.output.weight.t()).float(), v_first


class ChannelMix7(nn.Module):
    def __init__(self, config: RWKV7Config, device=None):
        super().__init__()
        C, F_ = config.hidden_size, config.ffn_size
        self.x_k = nn.Parameter(torch.zeros(1, 1, C, device=device))
        self.key = nn.Linear(C, F_, bias=False, device=device)
        self.value = nn.Linear(F_, C, bias=False, device=device)
        if config.deep_embed:
            D = DEEP_EMBED_RANK
            self.s1 = nn.Parameter(torch.zeros(C, D, device=device))
            self.s2 = nn.Parameter(torch.zeros(D, F_, device=device))
            self.s0 = nn.Parameter(torch.zeros(1, 1, F_, device=device))
            self.s_emb = nn.Embedding(config.vocab_size, D * D, _weight=torch.empty(config.vocab_size, D * D, device=device))
            self.s_emb_x = nn.Linear(C, D * D, bias=False, device=device)

    def forward(self, x, xx, is_start, tokens=None, embedded=None):
        dtype = self.key.weight.dtype
        sx = _shift(xx, is_start) - xx
        k = torch.relu((xx + sx * self.x_k[0, 0]).to(dtype) @ self.key.weight.t()) ** 2
        if hasattr(self, "s_emb"):  # DeepEmbed: per-token scales of the hidden units
            D = DEEP_EMBED_RANK
            table = (self.s_emb(tokens).float() + embedded @ self.s_emb_x.weight.t().float()).view(-1, D, D)
            ss = ((xx.to(dtype) @ self.s1).float()[:, None, :] @ table).squeeze(1)
            k = k * ((ss.to(dtype) @ self.s2).float() + self.s0[0, 0].float()).to(k.dtype)
        return x + (k @ self.value.weight.t()).float()


class Block7(nn.Module):
    def __init__(self, config: RWKV7Config, index: int, device=None):
        super().__init__()
        eps = config.layer_norm_eps
        if index == 0:
            self.ln0 = nn.LayerNorm(config.hidden_size, eps=eps, device=device)
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=eps, device=device)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=eps, device=device)
        self.att = TimeMix7(config, index, device)
        self.ffn = ChannelMix7(config, device)

    def forward(self, x, is_start, cu_seqlens, v_first, tokens=None, embedded=None):
        x, v_first = self.att(x, _layer_norm(self.ln1, x), is_start, cu_seqlens, v_first)
        return self.ffn(x, _layer_norm(self.ln2, x), is_start, tokens, embedded), v_first


class RWKV7(PackedStack):
    def __init__(self, config: RWKV7Config, device: str | torch.device | None = None):
        super().__init__(config, Block7, device)  # no fused kernels for x070: ``fused`` stays False

    def hidden_state(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, index: int) -> torch.Tensor:
        """``hidden_states[index]`` of every packed token (float32), running only the blocks needed."""
        x = self.embed(tokens)
        embedded = x if self.config.deep_embed else None
        is_start = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        is_start[cu_seqlens[:-1]] = True
        v_first = None
        for block in self.blocks[: min(index + 1, self.config.num_layers)]:
            x, v_first = block(x, is_start, cu_seqlens, v_first, tokens, embedded)
        return _layer_norm(self.ln_out, x) if index == self.config.num_layers else x
