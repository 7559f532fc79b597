"""RWKV-6 1B6 on a GPU: parity (bf16 CUDA vs fp32 CPU) and speed against the official runtime and
flash-linear-attention, all on the same random weights of the exact RWKV-6 World 1B6 shape.

    python benchmarks/rwkv_gpu.py weights /tmp/rwkv1b6.pth   # random 1B6-shaped weights (bf16 .pth)
    python benchmarks/rwkv_gpu.py parity  /tmp/rwkv1b6.pth   # pooled cosine, layers 1, 11, last
    python benchmarks/rwkv_gpu.py ours    /tmp/rwkv1b6.pth   # workloads A and B, layer 11 cut, memory
    python benchmarks/rwkv_gpu.py matmul                     # bf16 roofline
    python benchmarks/rwkv_gpu.py official /tmp/rwkv1b6.pth  # BlinkDL's runtime, one sentence per call
    python benchmarks/rwkv_gpu.py fla                        # flash-linear-attention RWKV6Model
    python benchmarks/rwkv_gpu.py report                     # the table, from the JSON lines written

Each step appends one JSON line per figure to --results (default benchmarks/rwkv_gpu.jsonl).
Sentences: 12–45 random world-vocabulary tokens; workload A = 816 (MRPC validation), B = 20,000.
Every timed shape is warmed up first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPE = dict(layers=24, hidden=2048, ffn=7168, vocab=65536)
WORKLOADS = {"A": 816, "B": 20000}


def sentences(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, SHAPE["vocab"], rng.integers(12, 46)).tolist() for _ in range(n)]


def record(args, **figure) -> None:
    print(json.dumps(figure), flush=True)
    with open(args.results, "a") as handle:
        handle.write(json.dumps(figure) + "\n")


def timed(function, warmup: int = 1, repeats: int = 3) -> float:
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def step_weights(args) -> None:
    from plugins.rwkv.random_checkpoint import random_state

    state = random_state(**SHAPE)
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, args.path)
    params = sum(v.numel() for v in state.values())
    record(args, step="weights", parameters=params, path=str(args.path))


def load_encoder(path, device, **options):
    from plugins.rwkv.encoder import RWKVEncoder, RWKVOptions

    encoder = RWKVEncoder(RWKVOptions(model=str(path), device=device, progress=False, **options))
    encoder.model
    return encoder


def mean_pooled(encoder, ids, layer):
    from plugins.pooling import MeanPooler

    vectors = torch.zeros(len(ids), SHAPE["hidden"])
    for batch in encoder.encode_tokens(ids, layer):
        vectors[batch.sentence_index] = MeanPooler().pool(batch).float().cpu()
    return vectors


def step_parity(args) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    ids = sentences(24, seed=1)
    cpu, gpu = load_encoder(args.path, "cpu"), load_encoder(args.path, "cuda", compile=not args.no_compile)
    for layer_value in (1, 11, -1):
        reference = mean_pooled(cpu, ids, cpu.resolve_layer(layer_value))
        fast = mean_pooled(gpu, ids, gpu.resolve_layer(layer_value))
        cosine = torch.nn.functional.cosine_similarity(reference.double(), fast.double(), dim=1)
        record(args, step="parity", compiled=not args.no_compile, layer=layer_value, sentences=len(ids),
               min_cosine=float(cosine.min()), mean_cosine=float(cosine.mean()))


def non_embedding_parameters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("emb.", "head.")))


def step_ours(args) -> None:
    from plugins.pooling import MeanPooler

    launch = tune_wkv(args) if args.tune_wkv else None
    encoder = load_encoder(args.path, "cuda", compile=not args.no_compile, batch_tokens=args.batch_tokens)
    weights = torch.cuda.memory_allocated()
    pooler = MeanPooler()

    def run(ids, layer):
        for batch in encoder.encode_tokens(ids, layer):
            pooler.pool(batch)

    for name, n in WORKLOADS.items():
        ids = sentences(n)
        tokens = sum(map(len, ids))
        for layer_value in (-1, 11):
            layer = encoder.resolve_layer(layer_value)
            torch.cuda.reset_peak_memory_stats()
            seconds = timed(lambda: run(ids, layer), warmup=1, repeats=3)
            record(args, step="ours", compiled=not args.no_compile, batch_tokens=args.batch_tokens, wkv_launch=launch, workload=name, layer=layer_value, blocks=layer.block + 1, sentences=n, tokens=tokens,
                   seconds=seconds, tokens_per_second=tokens / seconds, seconds_per_pair=2 * seconds / n,
                   peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30, weights_gib=weights / 2**30,
                   non_embedding_parameters=non_embedding_parameters(encoder.model))


def tune_wkv(args) -> dict:
    """Time the WKV kernel's launch choices on one 32k-token pack of workload-B sentences."""
    import triton.testing

    from plugins.rwkv import wkv_triton

    ids = sentences(WORKLOADS["B"])[:1100]
    lengths = torch.tensor([len(s) for s in ids])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).cuda()
    T, H, N = int(lengths.sum()), SHAPE["hidden"] // 64, 64
    r, k, v = (torch.randn(T, H, N, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    decay = torch.rand(T, H, N, device="cuda")
    u = torch.randn(H, N, device="cuda")
    timings = {}
    for block_v in (64, 32, 16):
        for warps in (1, 2, 4):
            ms = triton.testing.do_bench(lambda: wkv_triton.wkv6_triton(r, k, v, decay, u, cu, block_v, warps))
            timings[(block_v, warps)] = ms
            record(args, step="wkv", tokens=T, block_v=block_v, num_warps=warps, ms=ms)
    best = min(timings, key=timings.get)
    wkv_triton.LAUNCH.update(block_v=best[0], num_warps=best[1])
    return {"block_v": best[0], "num_warps": best[1]}


def step_wkv(args) -> None:
    print(tune_wkv(args))


def step_profile(args) -> None:
    """Where the time goes: CUDA kernels of 24-block forwards on workload B's first packs."""
    from torch.profiler import ProfilerActivity, profile

    encoder = load_encoder(args.path, "cuda", compile=not args.no_compile, batch_tokens=args.batch_tokens)
    ids = sentences(WORKLOADS["B"])[:3000]
    layer = encoder.resolve_layer(-1)
    for _ in range(2):
        for _batch in encoder.encode_tokens(ids, layer):
            pass
    torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _batch in encoder.encode_tokens(ids, layer):
            pass
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    gpu = sum(e.self_device_time_total for e in events) / 1e6
    print(f"wall {wall:.3f} s, GPU busy {gpu:.3f} s, tokens {sum(map(len, ids))}")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=28, max_name_column_width=90))


def step_matmul(args) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    seconds = timed(lambda: a @ b, warmup=3, repeats=10)
    record(args, step="matmul", tflops=2 * 8192**3 / seconds / 1e12)


def step_official(args) -> None:
    os.environ["RWKV_JIT_ON"] = "1"
    os.environ["RWKV_CUDA_ON"] = "1"
    from rwkv.model import RWKV

    for strategy in ("cuda bf16", "cuda fp16"):
        try:
            model = RWKV(model=str(args.path).removesuffix(".pth"), strategy=strategy)
            break
        except Exception as error:  # noqa: BLE001 - report and try the next strategy
            record(args, step="official", strategy=strategy, error=f"{type(error).__name__}: {error}"[:300])
    ids = sentences(WORKLOADS["B"])[: args.official_sentences]
    for warm in ids[:20]:
        model.forward(warm, None)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for sentence in ids:
        model.forward(sentence, None)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = sum(map(len, ids))
    record(args, step="official", strategy=strategy, sentences=len(ids), tokens=tokens, seconds=seconds,
           tokens_per_second=tokens / seconds, seconds_per_sentence=seconds / len(ids))


def step_fla(args) -> None:
    from fla.models import RWKV6Config, RWKV6Model

    config = RWKV6Config(hidden_size=SHAPE["hidden"], expand_k=1.0, expand_v=1.0, num_heads=SHAPE["hidden"] // 64,
                         intermediate_size=SHAPE["ffn"], num_hidden_layers=SHAPE["layers"], vocab_size=SHAPE["vocab"],
                         proj_low_rank_dim=32, gate_low_rank_dim=64, attn_mode="chunk")
    model = RWKV6Model(config).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    ids = sentences(WORKLOADS["B"])
    tokens = sum(map(len, ids))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batch = args.fla_batch
    batches = []
    for start in range(0, len(order), batch):
        chosen = [ids[i] for i in order[start:start + batch]]
        width = -(-max(map(len, chosen)) // 16) * 16  # bucket lengths: few shapes to compile
        padded = torch.zeros(batch, width, dtype=torch.long)
        for row, sentence in enumerate(chosen):
            padded[row, : len(sentence)] = torch.tensor(sentence)
        batches.append(padded.cuda())

    def padded_run():
        with torch.inference_mode():
            for input_ids in batches:
                model(input_ids=input_ids, use_cache=False)

    for shape in {tuple(b.shape) for b in batches}:  # warm every shape (Triton compiles and tunes)
        with torch.inference_mode():
            model(input_ids=torch.zeros(shape, dtype=torch.long, device="cuda"), use_cache=False)
    seconds = timed(padded_run, warmup=1, repeats=2)
    record(args, step="fla", mode=f"padded batches of {batch}", sentences=len(ids), tokens=tokens, seconds=seconds,
           tokens_per_second=tokens / seconds)


def step_report(args) -> None:
    figures = [json.loads(line) for line in open(args.results)]
    by = lambda **kw: [f for f in figures if all(f.get(k) == v for k, v in kw.items())]  # noqa: E731
    matmul = max((f["tflops"] for f in by(step="matmul")), default=None)
    official = next((f for f in by(step="official") if "tokens_per_second" in f), None)
    fla = next(iter(by(step="fla")), None)
    print("| measurement | tokens/s | notes |\n| --- | --- | --- |")
    for f in by(step="ours"):
        # FLOPs per token of the blocks that ran: 2 × their parameters (all blocks are the same size)
        flops = 2 * f["non_embedding_parameters"] * f["blocks"] / SHAPE["layers"] * f["tokens_per_second"] / 1e12
        notes = [f"{f['seconds']:.2f} s, {f['seconds_per_pair'] * 1e3:.2f} ms/pair",
                 f"peak {f['peak_gpu_gib']:.2f} GiB (weights {f['weights_gib']:.2f})"]
        if matmul:
            notes.append(f"{flops:.0f} TFLOP/s = {100 * flops / matmul:.0f}% of bf16 matmul ({matmul:.0f})")
        if official:
            notes.append(f"{f['tokens_per_second'] / official['tokens_per_second']:.1f}× official")
        if fla:
            notes.append(f"{f['tokens_per_second'] / fla['tokens_per_second']:.2f}× fla")
        setup = f"{'compiled' if f.get('compiled', True) else 'eager'}, packs of {f.get('batch_tokens') or 'default'} tokens"
        if f.get("wkv_launch"):
            setup += f", wkv {f['wkv_launch']}"
        print(f"| layerprobe ({setup}), workload {f['workload']}, {f['blocks']} blocks | {f['tokens_per_second']:,.0f} | {'; '.join(notes)} |")
    if official:
        print(f"| official rwkv ({official['strategy']}, 1 sentence/call, {official['sentences']} sentences) | "
              f"{official['tokens_per_second']:,.0f} | {official['seconds_per_sentence'] * 1e3:.1f} ms/sentence |")
    if fla:
        print(f"| flash-linear-attention RWKV6Model ({fla['mode']}), workload B | {fla['tokens_per_second']:,.0f} | {fla['seconds']:.2f} s |")
    for f in by(step="parity"):
        print(f"| parity bf16 CUDA ({'compiled' if f.get('compiled', True) else 'eager'}) vs fp32 CPU, layer {f['layer']} | | min pooled cosine {f['min_cosine']:.5f} over {f['sentences']} sentences |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["weights", "parity", "ours", "profile", "wkv", "matmul", "official", "fla", "report"])
    parser.add_argument("path", nargs="?", type=Path, default=Path("/tmp/rwkv1b6.pth"))
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "rwkv_gpu.jsonl")
    parser.add_argument("--official-sentences", type=int, default=300)
    parser.add_argument("--fla-batch", type=int, default=256)
    parser.add_argument("--batch-tokens", type=int, default=None, help="ours: tokens per packed forward")
    parser.add_argument("--no-compile", action="store_true", help="ours: skip torch.compile (eager elementwise)")
    parser.add_argument("--tune-wkv", action="store_true", help="ours: time the WKV kernel's launch choices first, use the best")
    args = parser.parse_args()
    globals()[f"step_{args.step}"](args)


if __name__ == "__main__":
    main()
