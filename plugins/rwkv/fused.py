"""RWKV-6 blocks on CUDA with the elementwise work between matmuls fused into Triton kernels.

Per block the matmuls run in cuBLAS (bf16), all but the ffn key's where the GPU family's launch
table says so (sm_90): that one is a Triton matmul with ReLU² as its epilogue (``key_relu_square``).
Everything between them runs in five kernels (four with that matmul):

    ln_shift_mix   the previous block's residual adds (stored), layer norm, token shift, lerp → bf16 (rows in a loop)
    lerp5          the five data-dependent mixes (the rank-32 LoRA as a small tl.dot; its tanh once per token)
    wkv_steps      WKV recurrence + decay exp(-exp(w)), then group norm + silu gate → bf16
    ln_shift_mix   (ffn) x + the attention output (used, not stored), layer norm, token shift, two lerps
    relu_square    ReLU² of the ffn key, in place (not with key_relu_square)

A block's two residual adds (attention's output, the ffn's sigmoid(r) ⊙ kv) are folded into the
next block's first kernel, so the float32 residual stream is written once per block and no
float32 copy of any other activation exists. Rounding to bfloat16 happens exactly where the eager
model in ``plugins.rwkv.model`` rounds (that model is the reference: same weights, same casts), so the two
agree to float32 reduction order. ``precompile`` compiles every kernel while the weights load
(Triton's disk cache keeps them); launch choices per GPU family are data in ``launch.json``,
never tuned on a user's call.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

LAUNCH_FILE = Path(__file__).with_name("launch.json")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (the CPU tests)


@functools.lru_cache(maxsize=None)
def launch_choices(capability: tuple[int, int]) -> dict:
    """The launch table for a GPU family (``sm_90`` …), else the table's safe ``default``."""
    table = json.loads(LAUNCH_FILE.read_text())
    return {**table["default"], **table.get(f"sm_{capability[0]}{capability[1]}", {})}


# Triton's interpreter truncates float32 → bfloat16 and has no inline assembly: kernels branch on this
_IN_INTERPRETER = tl.constexpr(INTERPRETED)


@triton.jit
def _sigmoid(x):
    """1 / (1 + 2^(-x·log2 e)) in float32. On the GPU four instructions with the hardware's exp2 and
    reciprocal (each within 2 ulp, far below the bf16 rounding that follows every use here):
    ``tl.sigmoid`` spends ~10 (denormal checks, an IEEE-style division). The interpreter has no
    inline assembly."""
    if _IN_INTERPRETER:
        return tl.sigmoid(x)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 t; mul.f32 t, $1, 0fBFB8AA3B; ex2.approx.ftz.f32 t, t; add.f32 t, t, 0f3F800000; "
            "rcp.approx.ftz.f32 $0, t; }", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _residual_inputs(X, ATT, R, KV, offset, mask, ADD_MODE: tl.constexpr):
    """The loads of ``_residual`` alone, so that a kernel can issue them early (x again for adds unused)."""
    x = tl.load(X + offset, mask=mask, other=0.0)
    att, r, kv = x, x, x
    if ADD_MODE >= 1:
        att = tl.load(ATT + offset, mask=mask, other=0.0).to(tl.float32)
    if ADD_MODE == 2:
        r = tl.load(R + offset, mask=mask, other=0.0).to(tl.float32)
        kv = tl.load(KV + offset, mask=mask, other=0.0).to(tl.float32)
    return x, att, r, kv


@triton.jit
def _residual_sum(x, att, r, kv, ADD_MODE: tl.constexpr):
    """The residual stream with the pending adds, in the eager model's order: 1 = + att_out;
    2 = + att_out, then + sigmoid(r) ⊙ kv (the ffn's)."""
    if ADD_MODE >= 1:
        x += att
    if ADD_MODE == 2:
        x += _bf16(_bf16(_sigmoid(r)).to(tl.float32) * kv).to(tl.float32)
    return x


@triton.jit
def _residual(X, ATT, R, KV, offset, mask, ADD_MODE: tl.constexpr):
    x, att, r, kv = _residual_inputs(X, ATT, R, KV, offset, mask, ADD_MODE)
    return _residual_sum(x, att, r, kv, ADD_MODE)


@triton.jit
def _bf16(x):
    """float32 → bfloat16, rounding to nearest even as PyTorch does: the GPU's own conversion (one
    instruction); in the interpreter (the CPU tests), the same rounding spelled out in bits."""
    if _IN_INTERPRETER:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(tl.bfloat16, fp_downcast_rounding="rtne")


@triton.jit
def _centre(x, mask, C: tl.constexpr, eps):
    mean = tl.sum(x, axis=0) / C
    centred = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(centred * centred, axis=0) / C + eps)
    return centred, mean, rstd


@triton.jit(do_not_specialize=["T"])
def _ln_shift_mix(X, X_OUT, ATT, R, KV, IS_START, LN_W, LN_B, MAA, MIX, STATS, T, eps,
                  C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, ADD_MODE: tl.constexpr,
                  WRITE_X: tl.constexpr, NUM_MIX: tl.constexpr, WRITE_STATS: tl.constexpr):
    """``ROWS`` consecutive tokens: x (+ pending adds) → X_OUT if ``WRITE_X``; ln(x); lerp toward the previous
    token's ln, which the loop carries (only the first row's predecessor is computed twice). Each
    row's loads are issued before the previous row's reductions (whose barriers would otherwise
    hold them back), so their latency overlaps that work."""
    first = tl.program_id(0).to(tl.int64) * ROWS
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    before_ok = mask & (first + tl.zeros_like(cols) > 0)  # conditions as vectors: the interpreter needs them so
    before_x, before_att, before_r, before_kv = _residual_inputs(X, ATT, R, KV, (first - 1) * C + cols, before_ok, ADD_MODE)
    ok = mask & (first + tl.zeros_like(cols) < T)
    x, att, r, kv = _residual_inputs(X, ATT, R, KV, first * C + cols, ok, ADD_MODE)
    has_prev = tl.load(IS_START + first + tl.zeros_like(cols), mask=ok, other=1) == 0  # a flag, as a vector
    w = tl.load(LN_W + cols, mask=mask, other=0.0)
    b = tl.load(LN_B + cols, mask=mask, other=0.0)
    before_centred, _, before_rstd = _centre(_residual_sum(before_x, before_att, before_r, before_kv, ADD_MODE), mask, C, eps)
    prev_ln = before_centred * before_rstd * w + b
    plane = T.to(tl.int64) * C
    last = tl.minimum(first + ROWS, T)
    for i in range(ROWS):
        row = first + i
        x = _residual_sum(x, att, r, kv, ADD_MODE)
        row_ok, row_has_prev = ok, has_prev
        ok = mask & (row + 1 + tl.zeros_like(cols) < last)  # the next row's loads, before this row's reductions
        x_next, att, r, kv = _residual_inputs(X, ATT, R, KV, (row + 1) * C + cols, ok, ADD_MODE)
        has_prev = tl.load(IS_START + row + 1 + tl.zeros_like(cols), mask=ok, other=1) == 0
        if WRITE_X:
            tl.store(X_OUT + row * C + cols, x, mask=row_ok)
        centred, mean, rstd = _centre(x, mask, C, eps)
        xx = centred * rstd * w + b
        if WRITE_STATS:
            pair = tl.arange(0, 2)
            tl.store(STATS + row * 2 + pair, tl.where(pair == 0, mean, rstd), mask=row + pair * 0 < T)
        sx = tl.where(row_has_prev, prev_ln, 0.0) - xx
        for m in tl.static_range(NUM_MIX):
            maa = tl.load(MAA + m * C + cols, mask=mask, other=0.0)
            tl.store(MIX + m * plane + row * C + cols, _bf16(xx + sx * maa), mask=row_ok)
        prev_ln = xx
        x = x_next


@triton.jit
def _dot(a, b, acc, DOT_BF16: tl.constexpr):
    """a @ b (+ acc) of bf16 tiles with float32 accumulation; without ``DOT_BF16`` the same products
    in tf32 (bf16 values are exact in tf32), for Triton's interpreter, which mishandles bf16 dots."""
    if DOT_BF16:
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")


@triton.jit
def _mix(MIX, i, plane, offsets, ok, xx, sx, lora, w2, MAA, cols, col_ok, C: tl.constexpr, DOT_BF16: tl.constexpr):
    """One of the five mixes: xx + sx ⊙ (maa_i + bf16(lora_i @ w2_i)) → bf16."""
    m = _bf16(_dot(lora, w2, None, DOT_BF16)).to(tl.float32)  # as the bf16 bmm rounds its product
    maa = tl.load(MAA + i * C + cols, mask=col_ok, other=0.0)[None, :]
    tl.store(MIX + i * plane + offsets, _bf16(xx + sx * (maa + m)), mask=ok)


@triton.jit(do_not_specialize=["T"])
def _lerp5(X, STATS, IS_START, LN_W, LN_B, LORA, W2, MAA, MIX, T,
           C: tl.constexpr, RANK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, DOT_BF16: tl.constexpr):
    """Mixes w, k, v, r, g of a [BT, BC] tile: xx + sx ⊙ (maa_i + lora_i @ w2_i), ``LORA`` already
    through tanh (once per token, not once per column tile). Every load is issued before the first
    dot: loading each mix's operands just before its dot left the kernel waiting on memory five
    times in a row (H100: 135 µs → 105 µs for 8192 tokens, the same bits)."""
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    row_ok, col_ok = rows < T, cols < C
    ok = row_ok[:, None] & col_ok[None, :]
    ranks = tl.arange(0, RANK)
    lora_at = LORA + rows[:, None] * (5 * RANK) + ranks[None, :]
    w2_at = W2 + ranks[:, None] * C + cols[None, :]
    lora_w = tl.load(lora_at, mask=row_ok[:, None], other=0.0)  # (Triton's compiler takes no loops over lists)
    lora_k = tl.load(lora_at + RANK, mask=row_ok[:, None], other=0.0)
    lora_v = tl.load(lora_at + 2 * RANK, mask=row_ok[:, None], other=0.0)
    lora_r = tl.load(lora_at + 3 * RANK, mask=row_ok[:, None], other=0.0)
    lora_g = tl.load(lora_at + 4 * RANK, mask=row_ok[:, None], other=0.0)
    w2_w = tl.load(w2_at, mask=col_ok[None, :], other=0.0)
    w2_k = tl.load(w2_at + RANK * C, mask=col_ok[None, :], other=0.0)
    w2_v = tl.load(w2_at + 2 * RANK * C, mask=col_ok[None, :], other=0.0)
    w2_r = tl.load(w2_at + 3 * RANK * C, mask=col_ok[None, :], other=0.0)
    w2_g = tl.load(w2_at + 4 * RANK * C, mask=col_ok[None, :], other=0.0)
    w = tl.load(LN_W + cols, mask=col_ok, other=0.0)[None, :]
    b = tl.load(LN_B + cols, mask=col_ok, other=0.0)[None, :]
    offsets = rows[:, None] * C + cols[None, :]
    x = tl.load(X + offsets, mask=ok, other=0.0)
    mean = tl.load(STATS + rows * 2, mask=row_ok, other=0.0)[:, None]
    rstd = tl.load(STATS + rows * 2 + 1, mask=row_ok, other=0.0)[:, None]
    has_prev = row_ok & (tl.load(IS_START + rows, mask=row_ok, other=1) == 0)
    prev_ok = has_prev[:, None] & col_ok[None, :]
    xp = tl.load(X + offsets - C, mask=prev_ok, other=0.0)
    mean_p = tl.load(STATS + (rows - 1) * 2, mask=has_prev, other=0.0)[:, None]
    rstd_p = tl.load(STATS + (rows - 1) * 2 + 1, mask=has_prev, other=0.0)[:, None]
    xx = (x - mean) * rstd * w + b
    sx = tl.where(prev_ok, (xp - mean_p) * rstd_p * w + b, 0.0) - xx
    plane = T.to(tl.int64) * C
    _mix(MIX, 0, plane, offsets, ok, xx, sx, lora_w, w2_w, MAA, cols, col_ok, C, DOT_BF16)
    _mix(MIX, 1, plane, offsets, ok, xx, sx, lora_k, w2_k, MAA, cols, col_ok, C, DOT_BF16)
    _mix(MIX, 2, plane, offsets, ok, xx, sx, lora_v, w2_v, MAA, cols, col_ok, C, DOT_BF16)
    _mix(MIX, 3, plane, offsets, ok, xx, sx, lora_r, w2_r, MAA, cols, col_ok, C, DOT_BF16)
    _mix(MIX, 4, plane, offsets, ok, xx, sx, lora_g, w2_g, MAA, cols, col_ok, C, DOT_BF16)


@triton.jit
def _norm_gate_store(out, G, Y, offsets, valid, ln_w, ln_b, eps, N: tl.constexpr):
    """Rows of WKV output [rows, N] (one head): group norm, times silu(g) rounded as eager does, → Y (bf16)."""
    mean = tl.sum(out, axis=1) / N
    centred = out - mean[:, None]
    rstd = 1.0 / tl.sqrt_rn(tl.sum(centred * centred, axis=1) / N + eps)
    gate = tl.load(G + offsets, mask=valid, other=0.0).to(tl.float32)
    gate = _bf16(gate * _sigmoid(gate)).to(tl.float32)
    tl.store(Y + offsets, _bf16((centred * rstd[:, None] * ln_w + ln_b) * gate), mask=valid)


RESCALE = tl.constexpr(30.0)  # the WKV folds the decay into its state before 1/decay passes e^30


@triton.jit
def _wkv_steps(R, K, V, WD, TIME_DECAY, U, G, LNX_W, LNX_B, Y, SCRATCH, CU_SEQLENS, NUM_SEQS, NEXT, eps,
               H: tl.constexpr, N: tl.constexpr, BT: tl.constexpr):
    """(Sentence, head) pairs, token by token: the state in float32 registers, each token's output
    to ``SCRATCH`` (float32); then group norm and gate over the sentence, ``BT`` tokens at a time.

    The programs of a head take its sentences from a queue (``NEXT[head]``, zero at launch, counts
    up to ``NUM_SEQS``, which is read on the device): any number of programs serves any number of
    sentences, so one CUDA graph launch serves every pack, and sentences of unequal length keep
    every program busy.

    The state is kept as ``S = diag(exp(level)) ⊙ scaled``, ``level`` being the log of the decay
    accumulated since the last rescale (per key, ≤ 0). A step is then two multiply-adds per state
    element (``scaled += (k/exp(level)) vᵀ``, ``out += (r·exp(level))ᵀ scaled``), not three: the
    decay moves from the [N, N] state onto two [N] vectors. Before ``1/exp(level)`` would pass
    ``e^RESCALE`` the decay is folded into the state (a plain step), so any decay, down to exactly
    0, stays exact to float32 rounding. The next token's inputs are loaded before the current one
    is computed: the loop is short and latency-bound.
    """
    head = tl.program_id(1)
    n = tl.arange(0, N)
    channel = head * N + n
    bonus = tl.load(U + channel)
    time_decay = tl.load(TIME_DECAY + channel)
    rows = tl.arange(0, BT)
    ln_w = tl.load(LNX_W + channel)[None, :]
    ln_b = tl.load(LNX_B + channel)[None, :]
    count = tl.load(NUM_SEQS)
    sentence = tl.atomic_add(NEXT + head, 1)
    while sentence < count:
        start = tl.load(CU_SEQLENS + sentence).to(tl.int64)
        end = tl.load(CU_SEQLENS + sentence + 1).to(tl.int64)
        scaled = tl.zeros([N, N], dtype=tl.float32)  # [key, value]
        level = tl.zeros([N], dtype=tl.float32)
        offset = start * H * N + channel
        r = tl.load(R + offset).to(tl.float32)
        k = tl.load(K + offset).to(tl.float32)
        v = tl.load(V + offset).to(tl.float32)
        wd = tl.load(WD + offset).to(tl.float32)
        for t in range(start, end):
            following = (t + 1 + tl.zeros_like(n)) < end
            next_offset = offset + H * N
            r_next = tl.load(R + next_offset, mask=following, other=0.0).to(tl.float32)
            k_next = tl.load(K + next_offset, mask=following, other=0.0).to(tl.float32)
            v_next = tl.load(V + next_offset, mask=following, other=0.0).to(tl.float32)
            wd_next = tl.load(WD + next_offset, mask=following, other=0.0).to(tl.float32)
            decayed = level - tl.exp(time_decay + wd)  # log of this token's decay is -exp(w)
            # out = r·(u⊙k) v + r·S: the bonus term is one dot product, not a [N, N] one
            out = tl.sum(r * bonus * k, axis=0) * v + tl.sum((r * tl.exp(level))[:, None] * scaled, axis=0)
            tl.store(SCRATCH + offset, out)  # normed after the loop: in it, the loop is ~30% slower (H100)
            if tl.min(decayed, axis=0) < -RESCALE:
                scaled = tl.exp(decayed)[:, None] * scaled + k[:, None] * v[None, :]
                level = tl.zeros_like(level)
            else:
                scaled += (k * tl.exp(-decayed))[:, None] * v[None, :]
                level = decayed
            offset = next_offset
            r, k, v, wd = r_next, k_next, v_next, wd_next
        tl.debug_barrier()  # the outputs above, stored by other threads of this program, are read below
        for first in range(start, end, BT):
            tokens = first + rows
            valid = (tokens < end)[:, None] & (n >= 0)[None, :]
            offsets = tokens[:, None] * (H * N) + channel[None, :]
            out = tl.load(SCRATCH + offsets, mask=valid, other=0.0)
            _norm_gate_store(out, G, Y, offsets, valid, ln_w, ln_b, eps, N)
        sentence = tl.atomic_add(NEXT + head, 1)


@triton.jit(do_not_specialize=["T"])
def _key_relu_square(X, W, OUT, T, F, C, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                     DOT_BF16: tl.constexpr):
    """The ffn key with its ReLU² as the matmul's epilogue: relu(bf16(x @ wᵀ))² → bf16 [T, F], the
    rounding of cuBLAS then ``_relu_square``. Saves that kernel's pass over the [T, F] key (H100,
    8192 × 2048 → 7168: cuBLAS + ``_relu_square`` 419 µs, a kernel like this one 332 µs on the same
    machine). Persistent: the programs walk [BM, BN] tiles, ``GROUP_M`` tile rows at a time so that
    a weight tile is reused from L2; the operands arrive by TMA (``X``, ``W``, ``OUT`` are tensor descriptors, OUT's block
    [BM, BN / 2]). The tile loop is flattened into the depth loop, so the next tile's loads are in
    flight during a tile's epilogue, which stores two halves (less shared memory: room for a 4th
    pipeline stage); with both, 341 → 322 µs on another H100."""
    tiles_m, tiles_n = tl.cdiv(T, BM), tl.cdiv(F, BN)
    in_group = GROUP_M * tiles_n
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0), flatten=True):
        first_m = (tile // in_group) * GROUP_M
        rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
        tile_m = first_m + (tile % in_group) % rows_in_group
        tile_n = (tile % in_group) // rows_in_group
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for depth in range(0, C, BK):
            x = X.load([tile_m * BM, depth])
            w = W.load([tile_n * BN, depth])
            acc = _dot(x, w.T, acc, DOT_BF16)
        key = tl.maximum(_bf16(acc).to(tl.float32), 0.0)
        left, right = _bf16(key * key).reshape(BM, 2, BN // 2).permute(0, 2, 1).split()
        OUT.store([tile_m * BM, tile_n * BN], left)
        OUT.store([tile_m * BM, tile_n * BN + BN // 2], right)


@triton.jit(do_not_specialize=["count"])
def _relu_square(X, count, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < count
    x = tl.maximum(tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32), 0.0)
    tl.store(X + offsets, _bf16(x * x), mask=mask)


@triton.jit(do_not_specialize=["T"])
def _residual_out(X, ATT, R, KV, LN_W, LN_B, OUT, T, eps, C: tl.constexpr, BLOCK_C: tl.constexpr,
                  ADD_MODE: tl.constexpr, NORM: tl.constexpr):
    """The last pending adds, and ``ln_out`` when the last entry of hidden_states is asked for."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = _residual(X, ATT, R, KV, row * C + cols, mask, ADD_MODE)
    if NORM:
        centred, _, rstd = _centre(x, mask, C, eps)
        x = centred * rstd * tl.load(LN_W + cols, mask=mask, other=0.0) + tl.load(LN_B + cols, mask=mask, other=0.0)
    tl.store(OUT + row * C + cols, x, mask=mask)


class _Pending:
    """Residual adds not yet applied: kernels downstream apply them while reading x. Mode 1: the
    attention's output; mode 2: that, then the ffn's sigmoid(r) ⊙ kv."""

    def __init__(self, mode: int = 0, att: torch.Tensor | None = None, r: torch.Tensor | None = None,
                 kv: torch.Tensor | None = None):
        self.mode, self.att, self.r, self.kv = mode, att, r, kv

    def args(self, x):
        return tuple(add if add is not None else x for add in (self.att, self.r, self.kv))


def _ln_shift_lerp(x, pending, is_start, norm, maa, rows, warps, stats=None, store_x=True):
    """(x with the pending adds, bf16 mixes [len(maa), T, C]); ``stats`` [T, 2] filled when given.
    With ``store_x`` false the sum is only used, not stored: x is returned as it came, ``pending``
    still to apply. ``rows`` per program and ``warps`` come from the launch table: the attention's
    side and the ffn's side are different specialisations, each with its own best choice."""
    T, C = x.shape
    write_x = store_x and pending.mode != 0
    x_out = torch.empty_like(x) if write_x else x
    mix = torch.empty(maa.shape[0], T, C, dtype=torch.bfloat16, device=x.device)
    _ln_shift_mix[(triton.cdiv(T, rows),)](x, x_out, *pending.args(x), is_start, norm.weight, norm.bias, maa, mix,
                                           stats if stats is not None else x, T, norm.eps, C=C,
                                           BLOCK_C=triton.next_power_of_2(C), ROWS=rows, ADD_MODE=pending.mode,
                                           WRITE_X=write_x, NUM_MIX=maa.shape[0], WRITE_STATS=stats is not None,
                                           num_warps=warps)
    return x_out, mix


def _stacked(module, names: tuple[str, ...]) -> torch.Tensor:
    """The mixing vectors ``names`` of ``module`` as one [len(names), C] tensor, made once per
    weights (not a concatenation kernel per block and pack)."""
    sources = [getattr(module, name) for name in names]
    key = (names, tuple(source.data_ptr() for source in sources))
    cached = getattr(module, "_fused_stacked", None)
    if cached is None or cached[0] != key:
        cached = module._fused_stacked = key, torch.cat(sources).view(len(names), -1)
    return cached[1]


def _projections(att) -> torch.Tensor:
    """The key, value, receptance and gate weights as one [4, A, C] tensor, for one batched matmul
    instead of four. Weights streamed from a .safetensors file already lie back to back in this
    order (``checkpoint.PROJECTIONS``): a view. Otherwise they are stacked once and the modules'
    weights become views of the stack, so it costs no memory beyond a transient copy."""
    linears = (att.key, att.value, att.receptance, att.gate)
    weights = [linear.weight for linear in linears]
    stacked = getattr(att, "_fused_projections", None)
    if stacked is not None and all(w.data_ptr() == stacked[i].data_ptr() for i, w in enumerate(weights)):
        return stacked
    first, size = weights[0], weights[0].numel()
    adjacent = all(w.dtype == first.dtype and w.shape == first.shape and w.is_contiguous()
                   and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                   and w.storage_offset() == first.storage_offset() + i * size for i, w in enumerate(weights))
    if adjacent:
        stacked = first.as_strided((len(weights), *first.shape), (size, first.shape[1], 1))
    else:
        stacked = torch.stack([w.data for w in weights])
        for i, linear in enumerate(linears):
            linear.weight.data = stacked[i]
    att._fused_projections = stacked
    return stacked


def _time_mix(att, x, mix_x, stats, norm, is_start, sentences, queue, launch):
    """att(ln1(x)) as the pending add of the attention output, from the residual stream ``x`` (every
    earlier add applied), its ln1 ``stats`` and the mix ``mix_x`` that ``_ln_shift_lerp`` made."""
    T, C = x.shape
    H, N = att.time_faaaa.shape
    lora = torch.tanh_(mix_x[0] @ att.time_maa_w1)  # bf16 in and out, as the eager model rounds it
    maa = _stacked(att, ("time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g"))
    mixes = torch.empty(5, T, C, dtype=torch.bfloat16, device=x.device)
    bt, bc = launch["lerp_rows"], launch["lerp_cols"]
    _lerp5[(triton.cdiv(T, bt), triton.cdiv(C, bc))](x, stats, is_start, norm.weight, norm.bias, lora, att.time_maa_w2,
                                                     maa, mixes, T, C=C, RANK=att.time_maa_w2.shape[1], BT=bt, BC=bc,
                                                     DOT_BF16=not INTERPRETED, num_warps=launch["lerp_warps"])
    k, v, r, g = torch.bmm(mixes[1:], _projections(att).transpose(1, 2)).unbind(0)  # mixes: w, k, v, r, g
    wd = torch.tanh(mixes[0] @ att.time_decay_w1) @ att.time_decay_w2
    del mixes, lora  # their memory serves the WKV's scratch
    y = torch.empty_like(r)
    _wkv_steps[(sentences.programs, H)](r, k, v, wd, att.time_decay.view(-1), att.time_faaaa, g, att.ln_x.weight,
                                        att.ln_x.bias, y, torch.empty(r.shape, dtype=torch.float32, device=r.device),
                                        sentences.cu_seqlens, sentences.count, queue, att.ln_x.eps, H=H, N=N,
                                        BT=launch["wkv_block"], num_warps=launch["wkv_warps"])
    return _Pending(1, y @ att.output.weight.t())


def _channel_mix(ffn, mix, attention: _Pending, launch):
    """The block's pending adds: ``attention``'s output, then ffn(ln2(x)) = sigmoid(r) ⊙ kv, from the
    mixes [2, T, C] (k, r) of ln2(x + attention's output)."""
    xk, xr = mix.unbind(0)
    key = relu_square_key(xk, ffn.key.weight, launch)
    return _Pending(2, attention.att, xr @ ffn.receptance.weight.t(), key @ ffn.value.weight.t())


def relu_square_key(x: torch.Tensor, weight: torch.Tensor, launch: dict) -> torch.Tensor:
    """relu(x @ weightᵀ)² in bf16: one Triton matmul with the square as its epilogue where the
    launch table says so (``key_matmul``; it needs TMA, sm_90 on), else cuBLAS and ``_relu_square``."""
    if launch["key_matmul"] == "triton" and all(_tma_ready(t) for t in (x, weight)):
        (T, C), F = x.shape, weight.shape[0]
        out = torch.empty(T, F, dtype=torch.bfloat16, device=x.device)
        bm, bn, bk = launch["key_rows"], launch["key_cols"], launch["key_depth"]
        tiles = triton.cdiv(T, bm) * triton.cdiv(F, bn)
        _key_relu_square[(min(tiles, _processors(x.device)),)](
            TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(weight, [bn, bk]),
            TensorDescriptor.from_tensor(out, [bm, bn // 2]), T, F, C, BM=bm, BN=bn, BK=bk, GROUP_M=launch["key_group"],
            DOT_BF16=not INTERPRETED, num_stages=launch["key_stages"], num_warps=launch["key_warps"])
        return out
    key = x @ weight.t()
    block = launch["elementwise_block"]
    _relu_square[(triton.cdiv(key.numel(), block),)](key, key.numel(), BLOCK=block, num_warps=launch["elementwise_warps"])
    return key


def _tma_ready(matrix: torch.Tensor) -> bool:
    """Whether a tensor descriptor can address ``matrix``: 16-byte aligned start and rows, unit column stride."""
    return matrix.data_ptr() % 16 == 0 and matrix.stride(0) * matrix.element_size() % 16 == 0 and matrix.stride(1) == 1


@functools.lru_cache(maxsize=None)
def _processors(device: torch.device) -> int:
    """Streaming multiprocessors: the programs a persistent kernel launches (a few in the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3


class Sentences:
    """Where the sentences of a packed batch start (``cu_seqlens``), how many there are (``count``,
    an int64 [1] tensor on the device) and how many programs per head the WKV kernel launches (by
    default one per sentence). Sizes that live on the device let one CUDA graph serve packs of
    any number of sentences."""

    def __init__(self, cu_seqlens: torch.Tensor, count: torch.Tensor | None = None, programs: int | None = None):
        self.cu_seqlens = cu_seqlens
        self.count = count if count is not None else cu_seqlens.new_full((1,), cu_seqlens.numel() - 1)
        self.programs = programs or max(1, cu_seqlens.numel() - 1)


def run_blocks(blocks, x: torch.Tensor, is_start: torch.Tensor, cu_seqlens: torch.Tensor | Sentences,
               final_norm: torch.nn.LayerNorm | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (float32 [T, C]) through ``blocks``, then ``final_norm`` if given: the eager model's
    result, written into ``out`` when given (a CUDA graph's output buffer: no copy)."""
    launch = launch_choices(torch.cuda.get_device_capability(x.device) if x.is_cuda else (0, 0))  # CPU: Triton's interpreter
    is_start = is_start.view(torch.uint8)
    sentences = cu_seqlens if isinstance(cu_seqlens, Sentences) else Sentences(cu_seqlens)
    heads = blocks[0].att.time_faaaa.shape[0] if len(blocks) else 0
    queues = torch.zeros(len(blocks), heads, dtype=torch.int32, device=x.device)  # per block's WKV: each head's next sentence
    T, C = x.shape
    pending = _Pending()
    for block, queue in zip(blocks, queues):
        # A block's first kernel applies the previous block's adds (attention's and ffn's) and stores
        # the residual stream: once per block. The old x and the adds are then dropped (del), so
        # their memory serves the block instead of adding to its peak. ln2 uses x + att_out
        # without storing it (a float32 [T, C] write and read fewer per block).
        stats = torch.empty(T, 2, dtype=torch.float32, device=x.device)
        x, mix_x = _ln_shift_lerp(x, pending, is_start, block.ln1, block.att.time_maa_x.view(1, C), launch["row_block"],
                                  launch["row_warps"], stats)
        del pending
        attention = _time_mix(block.att, x, mix_x, stats, block.ln1, is_start, sentences, queue, launch)
        del mix_x, stats
        _, mix = _ln_shift_lerp(x, attention, is_start, block.ln2, _stacked(block.ffn, ("time_maa_k", "time_maa_r")),
                                launch["ffn_row_block"], launch["ffn_row_warps"], store_x=False)
        pending = _channel_mix(block.ffn, mix, attention, launch)
        del mix, attention
    if not pending.mode and final_norm is None:
        return x if out is None else out.copy_(x)
    out = torch.empty_like(x) if out is None else out
    norm = final_norm if final_norm is not None else blocks[-1].ln1  # unused when NORM is false
    _residual_out[(T,)](x, *pending.args(x), norm.weight, norm.bias, out, T, norm.eps, C=C, BLOCK_C=triton.next_power_of_2(C),
                        ADD_MODE=pending.mode, NORM=final_norm is not None, num_warps=launch["row_warps"])
    return out


KERNELS = (_ln_shift_mix, _lerp5, _wkv_steps, _relu_square, _key_relu_square, _residual_out)  # what run_blocks launches


def _specializations(config, launch: dict, device: torch.device) -> list[tuple]:
    """(kernel, argument dtypes or values, keywords) of every launch ``run_blocks`` makes for a model
    of this config: what ``precompile`` compiles. Pointer arguments are given by dtype, as Triton's
    warm-up takes them, tensor descriptors on small tensors of ``device`` (their sizes are launch
    arguments); a kernel launched with other dtypes or constants compiles on first use."""
    f32, bf16, u8, i64 = torch.float32, torch.bfloat16, torch.uint8, torch.int64
    C, A, H, N = config.hidden_size, config.attention, config.num_heads, config.head_size
    row = dict(C=C, BLOCK_C=triton.next_power_of_2(C), num_warps=launch["row_warps"])
    eps, T = 1e-5, 4096
    specs = []
    adds = {0: (f32, f32, f32), 1: (bf16, f32, f32), 2: (bf16, bf16, bf16)}  # (att, r, kv) by mode; x when unused
    for add_mode in (0, 2):  # block 0, later blocks: ln1 + mix x
        specs.append((_ln_shift_mix, (f32, f32, *adds[add_mode], u8, f32, f32, f32, bf16, f32, T, eps),
                      dict(row, ROWS=launch["row_block"], ADD_MODE=add_mode, WRITE_X=add_mode != 0, NUM_MIX=1,
                           WRITE_STATS=True)))
    specs.append((_ln_shift_mix, (f32, f32, *adds[1], u8, f32, f32, f32, bf16, f32, T, eps),  # ln2 + mixes k, r
                  dict(row, ROWS=launch["ffn_row_block"], ADD_MODE=1, WRITE_X=False, NUM_MIX=2, WRITE_STATS=False,
                       num_warps=launch["ffn_row_warps"])))
    specs.append((_lerp5, (f32, f32, u8, f32, f32, bf16, bf16, f32, bf16, T),
                  dict(C=C, RANK=config.mix_rank, BT=launch["lerp_rows"], BC=launch["lerp_cols"], DOT_BF16=not INTERPRETED,
                       num_warps=launch["lerp_warps"])))
    specs.append((_wkv_steps, (bf16, bf16, bf16, bf16, f32, f32, bf16, f32, f32, bf16, f32, i64, i64, torch.int32, eps),
                  dict(H=H, N=N, BT=launch["wkv_block"], num_warps=launch["wkv_warps"])))
    specs.append((_relu_square, (bf16, T * config.ffn_size), dict(BLOCK=launch["elementwise_block"], num_warps=launch["elementwise_warps"])))
    if launch["key_matmul"] == "triton":
        bm, bn, bk = launch["key_rows"], launch["key_cols"], launch["key_depth"]
        x, w, out = (torch.empty(rows, cols, dtype=bf16, device=device) for rows, cols in ((bm, C), (bn, C), (bm, bn)))
        descriptors = (TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
                       TensorDescriptor.from_tensor(out, [bm, bn // 2]))
        specs.append((_key_relu_square, (*descriptors, T, config.ffn_size, C),
                      dict(BM=bm, BN=bn, BK=bk, GROUP_M=launch["key_group"], DOT_BF16=not INTERPRETED,
                           num_stages=launch["key_stages"], num_warps=launch["key_warps"])))
    for add_mode in (0, 2):
        for norm in (False, True):
            specs.append((_residual_out, (f32, *adds[add_mode], f32, f32, f32, T, eps), dict(row, ADD_MODE=add_mode, NORM=norm)))
    return specs


def precompile(config, device: torch.device) -> None:
    """Compile every kernel this model will launch, in parallel threads (Triton's asynchronous
    compile mode), or load them from Triton's disk cache; and initialise cuBLAS. Costs a second
    or two the first time on a machine, a fraction of that afterwards."""
    from triton.runtime._async_compile import AsyncCompileMode

    with torch.cuda.device(device):
        launch = launch_choices(torch.cuda.get_device_capability(device))
        specs = _specializations(config, launch, device)
        with ThreadPoolExecutor(max_workers=len(specs)) as pool, AsyncCompileMode(pool):
            for kernel, args, keywords in specs:
                kernel.warmup(*args, grid=(1,), **keywords)
        warm = torch.zeros(64, 64, dtype=torch.bfloat16, device=device)
        (warm @ warm).sum().item()  # cuBLAS handle and workspace


def precompile_in_background(config, device: torch.device) -> threading.Thread:
    """``precompile`` in a thread, so that it overlaps the weights' loading; join it before use."""
    def run():
        try:
            precompile(config, device)
        except Exception as error:  # noqa: BLE001 - only a head start: a kernel that fails here fails at its launch
            thread.error = error

    thread = threading.Thread(target=run, name="layerprobe-rwkv-precompile", daemon=True)
    thread.error = None
    thread.start()
    return thread
