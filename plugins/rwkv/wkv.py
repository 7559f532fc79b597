"""The WKV recurrence of RWKV-6 on packed sequences: a float32 reference, and a Triton kernel.

Per head, with state S (key dim × value dim), for each token t of a sentence:
    out_t = r_t · (diag(u) k_t v_tᵀ + S)        S ← k_t v_tᵀ + diag(d_t) S,   d_t = exp(-exp(w_t))
S starts at zero for every sentence.
"""

from __future__ import annotations

import torch


def wkv6(r, k, v, decay, u, cu_seqlens) -> torch.Tensor:
    """WKV of packed tokens ``[T, H, N]``; ``decay`` = exp(-exp(w)) in float32, ``u`` = time_faaaa ``[H, N]``.

    Returns float32 ``[T, H, N]``. CUDA tensors use the Triton kernel; anything else the reference.
    """
    if r.is_cuda:
        from plugins.rwkv.wkv_triton import wkv6_triton

        return wkv6_triton(r, k, v, decay, u, cu_seqlens)
    return wkv6_reference(r, k, v, decay, u, cu_seqlens)


def wkv6_reference(r, k, v, decay, u, cu_seqlens) -> torch.Tensor:
    """Step-by-step recurrence over right-padded sentences, in float32 (CPU, and tests)."""
    T, H, N = r.shape
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    B, width = len(lengths), int(lengths.max())
    sentence = torch.repeat_interleave(torch.arange(B, device=r.device), lengths)
    position = torch.arange(T, device=r.device) - cu_seqlens[:-1][sentence]

    def padded(x):
        out = x.new_zeros(B, width, H, N, dtype=torch.float32)
        out[sentence, position] = x.float()
        return out

    R, K, V, decay = padded(r), padded(k), padded(v), padded(decay)
    u = u.float()[None, :, :, None]
    state = r.new_zeros(B, H, N, N, dtype=torch.float32)
    out = torch.empty(B, width, H, N, dtype=torch.float32, device=r.device)
    for t in range(width):
        kv = K[:, t, :, :, None] * V[:, t, :, None, :]
        out[:, t] = torch.einsum("bhi,bhij->bhj", R[:, t], u * kv + state)
        state = kv + decay[:, t, :, :, None] * state
    return out[sentence, position]
