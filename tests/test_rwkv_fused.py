"""The fused Triton kernels of plugins.rwkv.fused against the eager model they replace.

On CUDA they run on the GPU; without one, in Triton's interpreter (``TRITON_INTERPRET=1``, set
before Triton is imported), so CI checks the very kernels users run. Both sides use the weights
as the CUDA path holds them (bf16 matrices, float32 vectors), so any difference beyond float32
reduction order and the odd bf16 rounding flip is a bug.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it)")

import torch.nn.functional as F  # noqa: E402

from plugins.rwkv import fused  # noqa: E402
from plugins.rwkv.checkpoint import Checkpoint, build_model, infer_config, parameter_dtype  # noqa: E402
from plugins.rwkv.model import Packed, _layer_norm, _shift  # noqa: E402
from plugins.rwkv.random_checkpoint import random_state  # noqa: E402
from plugins.rwkv.wkv import wkv6_reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LAYERS = 2
LENGTHS = [5, 1, 17, 9, 40]  # a one-token sentence, and one longer than a Triton block of rows


@pytest.fixture(scope="module")
def models():
    """(the CUDA-precision model, the float32 model) on DEVICE, random weights of a small shape."""
    state = random_state(LAYERS, 128, 448, 512, seed=3)
    checkpoint = Checkpoint(infer_config(state, "random"), state, "random")
    fast = build_model(checkpoint, DEVICE)
    for name, parameter in fast.named_parameters():
        parameter.data = parameter.data.to(parameter_dtype(name, parameter, torch.device("cuda")))
    return fast, build_model(checkpoint, "cpu").to(DEVICE)  # float32 everywhere, also on CUDA


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(11)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    return torch.randint(0, 512, (sum(LENGTHS),), generator=generator).to(DEVICE), cu.to(DEVICE)


def relative(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def embedded(model, tokens):
    return _layer_norm(model.blocks[0].ln0, model.emb(tokens).float())


@pytest.mark.parametrize("index", range(LAYERS + 1))
def test_fused_blocks_equal_the_eager_model(models, batch, index):
    """Every hidden_states entry (the last one after ln_out), as close to float32 as eager bf16 is."""
    fast, full = models
    tokens, cu = batch
    x = embedded(fast, tokens)
    blocks = fast.blocks[: min(index + 1, LAYERS)]
    out = fused.run_blocks(blocks, x, Packed(cu, x.shape[0]).is_start, cu, fast.ln_out if index == LAYERS else None)
    eager, reference = fast.hidden_state(tokens, cu, index), full.hidden_state(tokens, cu, index)
    assert out.dtype == torch.float32 and out.shape == eager.shape
    assert relative(out, eager) < 2e-3
    assert relative(out, reference) < 1.1 * relative(eager, reference) + 1e-4
    given = torch.full_like(out, float("nan"))  # a CUDA graph's output buffer: written in place
    assert fused.run_blocks(blocks, x, Packed(cu, x.shape[0]).is_start, cu, fast.ln_out if index == LAYERS else None,
                            out=given) is given
    assert torch.equal(given, out)


def test_fused_blocks_continue_from_a_block_output_and_apply_ln_out_alone(models, batch):
    """The resume path: from hidden_states[0] through block 1, and from the last block to ln_out only."""
    fast, _ = models
    tokens, cu = batch
    start = fast.hidden_state(tokens, cu, 0)
    is_start = Packed(cu, start.shape[0]).is_start
    assert relative(fused.run_blocks(fast.blocks[1:2], start, is_start, cu, None), fast.continue_from(start, cu, 0, 1)) < 2e-3
    last = fast.hidden_state(tokens, cu, LAYERS - 1)
    normed = fused.run_blocks(fast.blocks[LAYERS:], last, is_start, cu, fast.ln_out)
    assert relative(normed, _layer_norm(fast.ln_out, last)) < 1e-5


def test_lerp_kernels_equal_the_eager_mixes(models, batch):
    """Layer norm, token shift and the five LoRA mixes: bf16 results agree but for rounding flips."""
    fast, _ = models
    tokens, cu = batch
    att, norm = fast.blocks[0].att, fast.blocks[0].ln1
    x = embedded(fast, tokens)
    T, C = x.shape
    packed = Packed(cu, T)
    launch = {**fused.launch_choices((0, 0)), "row_block": 5}  # T is not a multiple of 5: a short last program
    stats = torch.empty(T, 2, device=DEVICE)
    _, mix_x = fused._ln_shift_lerp(x, fused._Pending(), packed.is_start.view(torch.uint8), norm,
                                    att.time_maa_x.view(1, C), launch["row_block"], launch["row_warps"], stats)
    xx = _layer_norm(norm, x)
    sx = _shift(xx, packed.is_start) - xx
    assert relative(mix_x[0], (xx + sx * att.time_maa_x[0, 0]).bfloat16()) < 1e-3
    assert torch.allclose(stats[:, 0], x.mean(1), atol=1e-5)

    lora = torch.tanh(mix_x[0] @ att.time_maa_w1)
    maa = torch.cat([att.time_maa_w, att.time_maa_k, att.time_maa_v, att.time_maa_r, att.time_maa_g]).view(5, C)
    mixes = torch.full((5, T, C), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    fused._lerp5[(-(-T // 32), -(-C // 64))](x, stats, packed.is_start.view(torch.uint8), norm.weight, norm.bias, lora,
                                             att.time_maa_w2, maa, mixes, T, C=C, RANK=32, BT=32, BC=64,
                                             DOT_BF16=not fused.INTERPRETED)
    m = torch.bmm(lora.view(T, 5, -1).transpose(0, 1), att.time_maa_w2).float()
    assert not mixes.isnan().any()
    assert relative(mixes, (xx + sx * (maa[:, None, :] + m)).bfloat16()) < 1e-3


@pytest.mark.parametrize("block, programs", [(16, len(LENGTHS)), (32, 2)])
@pytest.mark.parametrize("decays", ["slow", "fast", "zero"])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(100) in the interpreter: the zero decays
def test_wkv_kernel_equals_recurrence_group_norm_and_gate(models, batch, block, programs, decays):
    """Decays near 1 (their product stays above e^-30 over 40 tokens: the kernel never rescales its
    state), decays that multiply to far below e^-60 within a sentence (it rescales often), and
    decays of exactly 0 every third token (the state is wiped); sentences of 1 to 40 tokens; group
    norm and gate over tiles of ``block`` tokens; a program per sentence, or fewer programs than
    sentences, taking them from the queue (as in a CUDA graph)."""
    fast, _ = models
    _, cu = batch
    att = fast.blocks[0].att
    H, N = att.time_faaaa.shape
    T = int(cu[-1])
    generator = torch.Generator().manual_seed(5)
    r, k, v, g = (torch.randn(T, H * N, generator=generator).bfloat16().to(DEVICE) for _ in range(4))
    wd = 0.5 * torch.randn(T, H * N, generator=generator) + (4.0 if decays == "fast" else 0.0)
    if decays == "zero":
        wd[::3] = 100.0  # exp(-exp(100)) is exactly 0
    wd = wd.bfloat16().to(DEVICE)
    y = torch.full((T, H * N), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    common = (att.time_decay.view(-1), att.time_faaaa, g, att.ln_x.weight, att.ln_x.bias, y)
    scratch = torch.full((T, H * N), float("nan"), device=DEVICE)
    count = torch.tensor([len(LENGTHS)], device=DEVICE)
    queue = torch.zeros(H, dtype=torch.int32, device=DEVICE)
    fused._wkv_steps[(programs, H)](r, k, v, wd, *common, scratch, cu, count, queue, att.ln_x.eps, H=H, N=N, BT=block)
    assert queue.tolist() == [len(LENGTHS) + programs] * H  # each program took sentences until the queue ran out
    decay = torch.exp(-torch.exp(att.time_decay[0, 0] + wd.float()))
    if decays == "slow":
        assert float(decay.log()[:40].sum(0).min()) > -fused.RESCALE.value
    if decays == "fast":
        assert float(decay.log()[:16].sum(0).min()) < -60  # fast decays: the state fades within a sentence, exactly
    if decays == "zero":
        assert (decay[::3] == 0).all()
    states = wkv6_reference(r.view(T, H, N), k.view(T, H, N), v.view(T, H, N), decay.view(T, H, N), att.time_faaaa, cu)
    expected = (F.group_norm(states.view(T, H * N), H, att.ln_x.weight, att.ln_x.bias, att.ln_x.eps) * F.silu(g).float()).bfloat16()
    assert not y.isnan().any()
    assert relative(y, expected) < 1e-3


def test_relu_square_rounds_like_eager(models):
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(2)).bfloat16().to(DEVICE)
    expected = torch.relu(x) ** 2
    fused._relu_square[(1,)](x, x.numel(), BLOCK=4096)
    assert torch.equal(x, expected)


TRITON_KEY = dict(key_matmul="triton", key_rows=32, key_cols=64, key_depth=32, key_group=2, key_stages=2, key_warps=4)


def test_key_matmul_with_relu_square_epilogue_rounds_like_cublas_then_relu_square(models):
    """The Triton key matmul: tiles cut off at both edges (T, F not multiples of them), more tiles than programs."""
    fast, _ = models
    weight = fast.blocks[0].ffn.key.weight  # [448, 128]: 7 column tiles of 64
    x = torch.randn(77, weight.shape[1], generator=torch.Generator().manual_seed(5)).bfloat16().to(DEVICE)
    launch = {**fused.launch_choices((0, 0)), **TRITON_KEY}
    key = fused.relu_square_key(x, weight[:440], launch)  # a last column tile of 56
    expected = torch.relu(x @ weight[:440].t()) ** 2
    assert key.shape == expected.shape and not key.isnan().any()
    assert (key != expected).float().mean() < 0.01  # float32 sums in another order: the odd bf16 rounding flip
    assert relative(key, expected) < 1e-3
    rows_of_130 = torch.zeros(77, 130, dtype=torch.bfloat16, device=DEVICE)[:, :128]  # 260-byte rows: no TMA
    rows_of_130.copy_(x)
    assert torch.equal(fused.relu_square_key(rows_of_130, weight[:440], launch), expected)  # cuBLAS + relu_square


def test_channel_mix_is_the_same_with_either_key_matmul(models, batch):
    fast, _ = models
    tokens, _ = batch
    mix = torch.randn(2, len(tokens), 128, generator=torch.Generator().manual_seed(6)).bfloat16().to(DEVICE)
    default = fused.launch_choices((0, 0))
    assert default["key_matmul"] == "cublas"  # families without a tuned entry keep cuBLAS (no TMA needed)
    ffn = fast.blocks[1].ffn
    attention = fused._Pending(1, mix[0])
    cublas = fused._channel_mix(ffn, mix, attention, default)
    triton_key = fused._channel_mix(ffn, mix, attention, {**default, **TRITON_KEY})
    assert (cublas.mode, triton_key.mode) == (2, 2) and cublas.att is triton_key.att is attention.att
    assert torch.equal(cublas.r, triton_key.r)  # the receptance: cuBLAS either way
    assert relative(triton_key.kv, cublas.kv) < 2e-3


def test_bf16_conversion_rounds_to_nearest_even():
    """The kernels' one rounding helper, on ties and carries into the exponent."""
    import triton
    import triton.language as tl

    @triton.jit
    def convert(X, Y, count, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        tl.store(Y + offsets, fused._bf16(tl.load(X + offsets, mask=offsets < count)), mask=offsets < count)

    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 2 - 2**-9, -(1 + 2**-8), 3.0e38], dtype=torch.float32)
    x = torch.cat([ties, torch.randn(1000, generator=torch.Generator().manual_seed(4))]).to(DEVICE)
    y = torch.empty_like(x, dtype=torch.bfloat16)
    convert[(1,)](x, y, x.numel(), BLOCK=1024)
    assert torch.equal(y, x.bfloat16())


def test_padding_a_pack_to_a_graph_bucket_leaves_every_real_state_unchanged(models, batch):
    """What a CUDA graph runs: the pack padded with one-token sentences, the sentence count read on
    the device, fewer WKV programs than sentences. The real tokens' states are those of the pack alone."""
    from plugins.rwkv.graphs import padded_pack

    fast, _ = models
    tokens, cu = batch
    T = len(tokens)
    alone = fused.run_blocks(fast.blocks, embedded(fast, tokens), Packed(cu, T).is_start, cu, fast.ln_out)
    padded, cu_padded, is_start = padded_pack(tokens.cpu().numpy(), torch.tensor(LENGTHS).numpy(), T + 9)
    assert len(cu_padded) == len(LENGTHS) + 10 and is_start[T:].all()
    sentences = fused.Sentences(torch.from_numpy(cu_padded).to(DEVICE), torch.tensor([len(cu_padded) - 1], device=DEVICE),
                                programs=3)
    out = fused.run_blocks(fast.blocks, embedded(fast, torch.from_numpy(padded).to(DEVICE)),
                           torch.from_numpy(is_start).to(DEVICE), sentences, fast.ln_out)
    assert out.shape == (T + 9, alone.shape[1]) and not out.isnan().any()
    assert relative(out[:T], alone) < 1e-5


def test_attention_projections_are_one_tensor_without_a_copy(models):
    """The batched matmul's [4, A, C] weights: a view when the weights lie back to back in
    (key, value, receptance, gate) order, as streamed files place them; otherwise one stack that
    the modules' weights then view (their values unchanged)."""
    fast, _ = models
    att = fast.blocks[1].att
    linears = (att.key, att.value, att.receptance, att.gate)
    before = [linear.weight.clone() for linear in linears]
    stacked = fused._projections(att)
    assert stacked.shape == (4, *before[0].shape) and fused._projections(att) is stacked
    for linear, weight, view in zip(linears, before, stacked):
        assert linear.weight.data_ptr() == view.data_ptr() and torch.equal(linear.weight, weight)

    buffer = torch.randn(4 * before[0].numel() + 64, device=DEVICE).bfloat16()  # a streamed file's buffer
    block = build_model(Checkpoint(infer_config(random_state(1, 128, 448, 512, seed=6), "random"),
                                   random_state(1, 128, 448, 512, seed=6), "random"), DEVICE).blocks[0].att
    for i, linear in enumerate((block.key, block.value, block.receptance, block.gate)):
        linear.weight.data = buffer[64 + i * before[0].numel():][: before[0].numel()].view(before[0].shape)
    view = fused._projections(block)
    assert view.data_ptr() == buffer[64:].data_ptr() and torch.equal(view[2], block.receptance.weight)
