"""RWKV-6 1B6 fine-tuning on a GPU: training tokens/s of one step (forward, backward, AdamW) of
layerprobe's trainable RWKV-6 against flash-linear-attention's ``RWKV6Model`` doing the same step,
in the same run, with peak memory; and the WKV kernel's gradients against the PyTorch chunked form.

    python benchmarks/rwkv_finetune_gpu.py            # needs CUDA and flash-linear-attention (layerprobe[rwkv-train])
    python benchmarks/rwkv_finetune_gpu.py --pairs 16 64 --precision autocast bf16

The step is what ``finetune=contrastive`` runs per batch: pairs of sentences packed into one token
axis (``cu_seqlens``, no padding: both models' best mode), every block and the final norm, mean
pooling per sentence, CoSENT on the pairs' cosines, backward, AdamW. Both models get random weights
of the RWKV-6 World 1B6 shape and the same batches: ``--pairs`` pairs per step of 12–45-token
sentences (the paper's MRPC lengths), each step padded by one filler sequence (not pooled, not
counted) to a multiple of 512 tokens so fla compiles few shapes; every batch is warmed up first and
a figure is the median over passes of all batches. Precisions, the same for both models:
``autocast`` = float32 weights and AdamW state, bf16 matmuls under ``torch.autocast`` (what the
finetuner runs on CUDA); ``bf16`` = bf16 matrices (ours keeps vectors and norms float32, fla casts
everything).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPE = dict(layers=24, hidden=2048, ffn=7168, vocab=65536)
BUCKET = 512


def batches(pairs: int, steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]]:
    """(tokens [T], cu_seqlens [2·pairs + 2], real tokens, scores [pairs]) per step, on the GPU."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        lengths = rng.integers(12, 46, 2 * pairs).tolist()
        real = sum(lengths)
        filler = -real % BUCKET
        if filler:
            lengths.append(filler)
        tokens = torch.from_numpy(rng.integers(0, SHAPE["vocab"], sum(lengths))).cuda()
        cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32).cuda()
        out.append((tokens, cu, real, torch.from_numpy(rng.random(pairs)).float().cuda()))
    return out


def cosent(hidden: torch.Tensor, cu: torch.Tensor, pairs: int, scores: torch.Tensor) -> torch.Tensor:
    """Mean of each sentence's tokens, cosine per pair, CoSENT (scale 20), as sentence-transformers' CoSENTLoss."""
    sentences = 2 * pairs
    lengths = (cu[1:] - cu[:-1]).long()
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
    real = owner < sentences
    sums = hidden.new_zeros(sentences, hidden.shape[-1]).index_add_(0, owner[real], hidden[real].float())
    means = sums / lengths[:sentences, None]
    cos = torch.nn.functional.cosine_similarity(means[0::2], means[1::2]) * 20
    diff = cos[None, :] - cos[:, None]
    diff = diff[scores[:, None] > scores[None, :]]
    return torch.logsumexp(torch.cat([diff.new_zeros(1), diff]), 0)


def ours(precision: str):
    from plugins.rwkv.checkpoint import Checkpoint, build_model, infer_config
    from plugins.rwkv.random_checkpoint import random_state
    from plugins.rwkv.trainable import RWKVTransformer

    state = random_state(**SHAPE, device="cuda")
    device = "cuda" if precision == "bf16" else "cpu"  # autocast: float32 weights; bf16: the inference dtypes
    checkpoint = Checkpoint(infer_config(state, "random 1B6"), {k: v.to(device) for k, v in state.items()}, "random")
    del state
    module = RWKVTransformer(build_model(checkpoint, device)) if precision == "autocast" else None
    if module is not None:
        model = module.rwkv.cuda()
        module._use_kernels(torch.device("cuda"))
    else:  # bf16 matrices as build_model makes them on CUDA; the trainable module would cast them to float32
        model = build_model(checkpoint, "cuda").train().requires_grad_(True)
        from plugins.rwkv.wkv import install_wkv

        install_wkv(model, torch.device("cuda"))
    model.head.requires_grad_(False)  # unused by sentence embeddings (as in the finetuner's module)
    return model, lambda tokens, cu: model.hidden_state(tokens, cu.long(), SHAPE["layers"])


def fla(precision: str):
    from fla.models import RWKV6Config, RWKV6Model

    config = RWKV6Config(hidden_size=SHAPE["hidden"], expand_k=1.0, expand_v=1.0, num_heads=SHAPE["hidden"] // 64,
                         intermediate_size=SHAPE["ffn"], num_hidden_layers=SHAPE["layers"], vocab_size=SHAPE["vocab"],
                         proj_low_rank_dim=32, gate_low_rank_dim=64, attn_mode="chunk")
    model = RWKV6Model(config).to("cuda", torch.bfloat16 if precision == "bf16" else torch.float32).train()
    return model, lambda tokens, cu: model(input_ids=tokens[None], cu_seqlens=cu, use_cache=False).last_hidden_state[0]


def measure(name: str, build, precision: str, steps, pairs: int, passes: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, forward = build(precision)
    weights = torch.cuda.memory_allocated()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    autocast = torch.autocast("cuda", torch.bfloat16) if precision == "autocast" else contextlib.nullcontext()

    def step(tokens, cu, real, scores):
        with autocast:
            loss = cosent(forward(tokens, cu), cu, pairs, scores)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for batch in steps:  # warm-up: compiles/tunes every shape, allocates the optimizer's state
        step(*batch)
    torch.cuda.synchronize()
    times = []
    for _ in range(passes):
        started = time.perf_counter()
        for batch in steps:
            loss = step(*batch)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    seconds = float(np.median(times))
    tokens = sum(b[2] for b in steps)
    figure = dict(model=name, precision=precision, pairs_per_step=pairs, steps=len(steps), tokens=tokens,
                  seconds=seconds, tokens_per_second=tokens / seconds, step_ms=1000 * seconds / len(steps),
                  peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30, weights_gib=weights / 2**30,
                  final_loss=float(loss), finite=bool(torch.isfinite(loss)))
    print(json.dumps(figure), flush=True)
    del model, optimizer
    torch.cuda.empty_cache()
    return figure


def kernel_check() -> dict:
    """fla's chunk_rwkv6 (as the trainable module calls it) against the PyTorch chunked WKV: outputs and
    the gradients of every input, float32, on packed sentences of different lengths."""
    from plugins.rwkv.wkv import fla_wkv6
    from plugins.rwkv.wkv import wkv6_chunked

    g = torch.Generator("cuda").manual_seed(0)
    lengths = torch.tensor([7, 45, 130, 1, 64], device="cuda")
    cu = torch.zeros(len(lengths) + 1, dtype=torch.long, device="cuda")
    cu[1:] = lengths.cumsum(0)
    T, H, N = int(lengths.sum()), 4, 64

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).requires_grad_(True)

    r, k, v, w, u = leaf(T, H, N, scale=0.5), leaf(T, H, N, scale=0.5), leaf(T, H, N), leaf(T, H, N), leaf(H, N, scale=0.3)
    weights = torch.randn(T, H, N, generator=g, device="cuda")
    results = {}
    for name, wkv in (("fla", fla_wkv6), ("torch", lambda *a: wkv6_chunked(a[0], a[1], a[2], torch.exp(a[3]), a[4], a[5]))):
        for t in (r, k, v, w, u):
            t.grad = None
        out = wkv(r, k, v, -torch.exp(w - 1), u, cu)
        (out * weights).sum().backward()
        results[name] = [out.detach().clone()] + [t.grad.clone() for t in (r, k, v, w, u)]
    errors = {name: float((a - b).abs().max() / b.abs().max())
              for name, a, b in zip(("out", "dr", "dk", "dv", "dw", "du"), results["fla"], results["torch"])}
    figure = {"check": "chunk_rwkv6 vs torch chunked (float32), max error relative to max", **errors}
    print(json.dumps(figure), flush=True)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--precision", nargs="+", default=["autocast", "bf16"], choices=["autocast", "bf16"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "fla": __import__("fla").__version__}), flush=True)
    kernel_check()
    rows = []
    for precision in args.precision:
        for pairs in args.pairs:
            steps = batches(pairs, args.steps)
            ours_figure = measure("layerprobe", ours, precision, steps, pairs, args.passes)
            fla_figure = measure("fla RWKV6Model", fla, precision, steps, pairs, args.passes)
            rows.append((precision, pairs, ours_figure, fla_figure))
    print("\n| precision | pairs/step | layerprobe tok/s | fla tok/s | ratio | layerprobe peak GiB | fla peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for precision, pairs, a, b in rows:
        print(f"| {precision} | {pairs} | {a['tokens_per_second']:,.0f} | {b['tokens_per_second']:,.0f} | "
              f"{a['tokens_per_second'] / b['tokens_per_second']:.2f}× | {a['peak_gpu_gib']:.1f} | {b['peak_gpu_gib']:.1f} |")


if __name__ == "__main__":
    main()
