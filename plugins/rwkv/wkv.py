"""The WKV recurrence of RWKV-6 on packed sequences: chunked (matmuls within chunks), and a step-by-step reference.

Per head, with state S (key dim × value dim), for each token t of a sentence:
    out_t = r_t · (diag(u) k_t v_tᵀ + S)        S ← k_t v_tᵀ + diag(d_t) S,   d_t = exp(-exp(w_t))
S starts at zero for every sentence.
"""

from __future__ import annotations

import torch


def wkv6(r, k, v, decay, u, cu_seqlens) -> torch.Tensor:
    """WKV of packed tokens ``[T, H, N]``; ``decay`` = exp(-exp(w)) in float32, ``u`` = time_faaaa ``[H, N]``.

    Returns float32 ``[T, H, N]``, by the chunked form on any device (the eager model's path; on
    CUDA the fused kernel of ``plugins.rwkv.fused`` runs instead unless ``encoder.fused=false``).
    """
    return wkv6_chunked(r, k, v, decay, u, cu_seqlens)


CHUNK = 32  # tokens per chunk: within it, matmuls; between chunks, the carried state
# Within a chunk whose decays multiply to more than e^-60, exp(-Σ log d) stays far from float32's
# overflow (e^88), so the chunk's attention factorises into one matmul; below it, the exact form.
SAFE_LOG_DECAY = -60.0
GROUP_ELEMENTS = 2**25  # bound on the [sentences, heads, chunk, chunk, N] decay tensor per step (128 MiB float32)


def wkv6_chunked(r, k, v, decay, u, cu_seqlens, chunk: int = CHUNK) -> torch.Tensor:
    """The same recurrence, a chunk of tokens at a time (float32), for the CPU.

    Within a chunk the contributions of earlier tokens are a masked ``[chunk, chunk]`` attention
    whose weights carry the decays between the two tokens: a matmul of decay-scaled r and k when
    the chunk's decays cannot overflow that split, else exp(Σ log d) ≤ 1 per key channel in log
    space; the state enters once per chunk and is carried to the next. Per token that is a few small matmuls instead of a
    ``[heads, N, N]`` state read and written at every step (the reference), and the Python loop
    runs over chunks, not tokens. Padding beyond a sentence has decay 1 and k = v = 0: it changes
    nothing. Matches ``wkv6_reference`` to float32 rounding.
    """
    T, H, N = r.shape
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    B = len(lengths)
    width = int(lengths.max())  # the last chunk may be shorter: no padding beyond the longest sentence
    sentence = torch.repeat_interleave(torch.arange(B, device=r.device), lengths)
    position = torch.arange(T, device=r.device) - cu_seqlens[:-1][sentence]

    def padded(x, fill=0.0):  # [B, H, width, N], laid out so that a chunk is one slice
        out = torch.full((B, H, width, N), fill, dtype=torch.float32, device=r.device)
        out[sentence, :, position] = x.float()
        return out

    R, K, V = padded(r), padded(k), padded(v)
    log_decay = padded(decay, 1.0).clamp_min_(torch.finfo(torch.float32).tiny).log_()
    bonus = u.float()[None, :, None, :]
    out = torch.empty(B, H, width, N, dtype=torch.float32, device=r.device)
    strict = torch.ones(chunk, chunk, dtype=torch.bool, device=r.device).tril(-1)  # s < t
    group = max(1, GROUP_ELEMENTS // (H * chunk * chunk * N))
    for first in range(0, B, group):
        rows = slice(first, first + group)
        longest = int(lengths[rows].max())  # packs come sorted by length: a group needs little padding
        state = None  # zero until the first chunk has been seen
        for start in range(0, longest, chunk):
            cols = slice(start, min(start + chunk, longest))
            earlier = strict[: cols.stop - start, : cols.stop - start]
            rc, kc, vc, lc = R[rows, :, cols], K[rows, :, cols], V[rows, :, cols], log_decay[rows, :, cols]
            total = lc.cumsum(dim=2)  # Σ log d up to and including each token
            # weight of token s's k v in token t's output (s < t): r_t · (k_s ⊙ exp(before_t − total_s))
            if float(total[:, :, -1].detach().min()) > SAFE_LOG_DECAY:
                # exp(before_t) · exp(−total_s) cannot overflow here: one matmul per chunk
                r_decayed = rc * (total - lc).exp()  # r_t ⊙ exp(Σ log d up to the token before)
                attention = (r_decayed @ (kc * (-total).exp()).transpose(2, 3)).masked_fill_(~earlier, 0.0)
            else:
                # a chunk that decays below e^SAFE_LOG_DECAY: each pair's exponent, per channel, from sums
                # in float64 (differences of sums in the hundreds would lose float32's digits)
                total = lc.double().cumsum(dim=2)
                before = total - lc
                exponent = (before[:, :, :, None, :] - total[:, :, None, :, :]).masked_fill(~earlier[:, :, None], float("-inf"))
                attention = (rc[:, :, :, None, :] * kc[:, :, None, :, :] * exponent.exp().float()).sum(-1)
                r_decayed = rc * before.exp().float()
            result = attention @ vc
            result.addcmul_((rc * bonus * kc).sum(-1, keepdim=True), vc)  # the token's own k v, weighted by u
            if state is not None:
                result.add_(r_decayed @ state)
            out[rows, :, cols] = result
            if cols.stop < longest:  # carry the state to the next chunk
                carried = (kc * (total[:, :, -1:, :] - total).exp().to(kc.dtype)).transpose(2, 3) @ vc
                state = carried if state is None else carried.add_(total[:, :, -1, :, None].exp().to(kc.dtype) * state)
    return out[sentence, :, position]


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


def fla_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("fla") is not None


def install_wkv(model, device) -> bool:
    """Every block's WKV for ``device`` (RWKV-6 or RWKV-7): flash-linear-attention's chunked
    kernels (forward and backward) on CUDA when it is installed, else the PyTorch forms (the
    chunked RWKV-6 WKV, the RWKV-7 step form). Returns whether fla's kernels were installed."""
    from plugins.rwkv.model import wkv_from_log_decay
    from plugins.rwkv.model7 import wkv7

    seven = getattr(model.config, "version", 6) == 7
    kernel = device.type == "cuda" and fla_available()
    wkv = (fla_wkv7 if kernel else wkv7) if seven else (fla_wkv6 if kernel else wkv_from_log_decay)
    for block in model.blocks:
        block.att.wkv = wkv
    return kernel


def fla_wkv6(r, k, v, log_decay, u, cu_seqlens) -> torch.Tensor:
    """flash-linear-attention's chunked RWKV-6 kernels on the packed tokens (B = 1, ``cu_seqlens``):
    the same recurrence as ``plugins.rwkv.wkv`` with log d, u as given and no 1/√N scale."""
    from fla.ops.rwkv6 import chunk_rwkv6

    dtype = r.dtype  # bf16 under autocast; the log decays stay float32 (fla sums them in float32)
    out, _ = chunk_rwkv6(r[None], k.to(dtype)[None], v.to(dtype)[None], log_decay.float()[None], u.to(dtype), scale=1.0,
                         cu_seqlens=cu_seqlens)
    return out[0].float()


def fla_wkv7(r, log_w, k, v, a, b, cu_seqlens) -> torch.Tensor:
    """flash-linear-attention's chunked RWKV-7 kernel (the generalised delta rule, forward and
    backward) on packed tokens: ``S ← S diag(w) + (S a) bᵀ + v kᵀ``, out = ``S r``, no scale."""
    from fla.ops.rwkv7 import chunk_rwkv7

    dtype = r.dtype  # the options fla's own RWKV-7 layer passes: log decays bounded below by -e^-0.5
    out, _ = chunk_rwkv7(r[None], log_w.float()[None], k.to(dtype)[None], v.to(dtype)[None], a.to(dtype)[None],
                         b.to(dtype)[None], scale=1.0, cu_seqlens=cu_seqlens, safe_gate=True,
                         lower_bound=-0.6065306597126334, chunk_size=64)
    return out[0].float()
