"""A Triton kernel for the RWKV-6 WKV recurrence on packed variable-length sentences.

Sentences here are short (tens of tokens) and many, so a recurrent kernel with one program per
(sentence, head, value block) beats chunked formulations: no padding, no chunk bookkeeping, the
64×64 state lives in registers in float32, and tens of thousands of programs fill the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _wkv6_forward(R, K, V, W, U, O, CU_SEQLENS, H: tl.constexpr, N: tl.constexpr, BV: tl.constexpr):
    sentence, head, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(CU_SEQLENS + sentence).to(tl.int64)
    end = tl.load(CU_SEQLENS + sentence + 1).to(tl.int64)
    key = tl.arange(0, N)
    value = block * BV + tl.arange(0, BV)
    bonus = tl.load(U + head * N + key).to(tl.float32)
    state = tl.zeros([N, BV], dtype=tl.float32)
    for t in range(start, end):
        base = (t * H + head) * N
        r = tl.load(R + base + key).to(tl.float32)
        k = tl.load(K + base + key).to(tl.float32)
        w = tl.load(W + base + key).to(tl.float32)
        v = tl.load(V + base + value).to(tl.float32)
        kv = k[:, None] * v[None, :]
        out = tl.sum(r[:, None] * (bonus[:, None] * kv + state), axis=0)
        tl.store(O + base + value, out)
        state = kv + tl.exp(-tl.exp(w))[:, None] * state


def wkv6_triton(r, k, v, w, u, cu_seqlens, block_v: int = 64) -> torch.Tensor:
    T, H, N = r.shape
    r, k, v, w = (x.contiguous() for x in (r, k, v, w))
    out = torch.empty(T, H, N, dtype=torch.float32, device=r.device)
    block_v = min(block_v, N)
    grid = (cu_seqlens.numel() - 1, H, N // block_v)
    _wkv6_forward[grid](r, k, v, w, u.contiguous(), out, cu_seqlens.contiguous(), H=H, N=N, BV=block_v, num_warps=4)
    return out
