"""RWKV-6 1B6 on a GPU: time to first result, steady state against flash-linear-attention's packed
mode and the bf16 matmul roofline, memory, and parity with float32 on the CPU, all on the same
random weights of the exact RWKV-6 World 1B6 shape.

    python benchmarks/rwkv_gpu.py all      /tmp/rwkv1b6.safetensors   # every step below, in one run, then the table
    python benchmarks/rwkv_gpu.py weights  /tmp/rwkv1b6.safetensors   # random 1B6-shaped weights (bf16 .pth)
    python benchmarks/rwkv_gpu.py matmul                      # the bf16 roofline (8192³ cuBLAS)
    python benchmarks/rwkv_gpu.py cold     /tmp/rwkv1b6.safetensors   # fresh processes: empty, then warm compile caches
    python benchmarks/rwkv_gpu.py ours     /tmp/rwkv1b6.safetensors   # workloads A and B, 24 and 12 blocks, memory
    python benchmarks/rwkv_gpu.py fla                         # flash-linear-attention RWKV6Model: packed and padded
    python benchmarks/rwkv_gpu.py parity   /tmp/rwkv1b6.safetensors   # pooled cosine vs fp32 CPU, layers 1, 11, last
    python benchmarks/rwkv_gpu.py tune     /tmp/rwkv1b6.safetensors   # launch choices of the fused kernels → launch.json
    python benchmarks/rwkv_gpu.py official /tmp/rwkv1b6.safetensors   # BlinkDL's runtime, one sentence per call
    python benchmarks/rwkv_gpu.py report                      # the table, from the JSON lines written
    python benchmarks/rwkv_gpu.py all --version 7 /tmp/rwkv7g1.safetensors   # RWKV-7 (G1 1.5B shape) against fla's RWKV7Model

With ``--version 7`` the weights are RWKV-7's (x070, 24 blocks, hidden 2048, ffn 8192, low ranks
96/96/64/256), fla's peer is ``RWKV7Model`` loaded with those same weights (``blinkdl7_to_fla``),
and parity also compares our bf16 vectors with fla's at the last layer.

Each step appends one JSON line per figure to --results (default benchmarks/rwkv_gpu.jsonl); the
report reads the latest figure of each kind and prints every speed as a ratio to fla packed and to
the roofline. Sentences: 12–45 random world-vocabulary tokens; workload A = 816 sentences (MRPC
validation's size), B = 20,000. Every timed shape is warmed up first (fla's too: it compiles per
shape, so its packs are bucketed to few shapes); a workload's time is the median of at least 3
calls and of as many as fill 2 s (ours and fla packed alike).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()  # before the heavy imports: the cold step's child reports import time

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPE = dict(layers=24, hidden=2048, ffn=7168, vocab=65536)
VERSION = 6  # --version: 7 benchmarks RWKV-7 (its shape: ffn 4 × hidden)
WORKLOADS = {"A": 816, "B": 20000}
FLA_PACK = 65536  # tokens per fla packed forward (its kernels' varlen mode)


def sentences(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, SHAPE["vocab"], rng.integers(12, 46)).tolist() for _ in range(n)]


def record(args, **figure) -> None:
    figure["run"] = args.run
    print(json.dumps(figure), flush=True)
    with open(args.results, "a") as handle:
        handle.write(json.dumps(figure) + "\n")


def timed(function, warmup: int = 1, repeats: int = 3, at_least: float = 0.0) -> float:
    """Median seconds of ``repeats`` calls, or of as many as fill ``at_least`` seconds: a 0.13 s
    workload timed 3 times moves by a few percent with one slow call of a noisy machine."""
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    times = []
    while len(times) < repeats or sum(times) < at_least:
        started = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def step_weights(args) -> None:
    from plugins.rwkv.random_checkpoint import random_state

    from safetensors.torch import save_file

    if VERSION == 7:
        from plugins.rwkv.random_checkpoint import random_state7

        state = random_state7(SHAPE["layers"], SHAPE["hidden"], None, SHAPE["vocab"], device="cuda")
    else:
        state = random_state(**SHAPE)  # on the CPU: the same numbers as earlier sessions' (and the issue's) weights
    state = {k: v.to(torch.bfloat16).cpu().contiguous() for k, v in state.items()}
    torch.save(state, args.path.with_suffix(".pth"))
    save_file(state, str(args.path.with_suffix(".safetensors")))  # what `python -m plugins.rwkv.convert` writes
    record(args, step="weights", parameters=sum(v.numel() for v in state.values()), path=str(args.path),
           gib=args.path.with_suffix(".pth").stat().st_size / 2**30)


def load_encoder(path, device, **options):
    from plugins.rwkv.encoder import RWKVEncoder, RWKVOptions

    encoder = RWKVEncoder(RWKVOptions(model=str(path), device=device, progress=False, **options))
    encoder.model
    return encoder


def pooled(encoder, ids, layer) -> torch.Tensor:
    """Mean-pooled vectors on the host: what a job needs before it can score a pair, made as the
    job's ``framework.run.embed`` makes them (the result allocated once the first batch is in, so
    that the host's allocation overlaps the GPU's first pack)."""
    from plugins.pooling import MeanPooler

    vectors = None
    for batch in encoder.encode_tokens(ids, layer):
        vector = MeanPooler().pool(batch).float().cpu()
        if vectors is None:
            vectors = torch.zeros(len(ids), vector.shape[1])
        vectors[batch.sentence_index] = vector
    return vectors


def step_parity(args) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    ids = sentences(24, seed=1)
    cpu, gpu = load_encoder(args.path, "cpu"), load_encoder(args.path, "cuda", fused=not args.eager)
    for layer_value in (1, 11, -1):
        reference = pooled(cpu, ids, cpu.resolve_layer(layer_value))
        fast = pooled(gpu, ids, gpu.resolve_layer(layer_value))
        cosine = torch.nn.functional.cosine_similarity(reference.double(), fast.double(), dim=1)
        record(args, step="parity", fused=not args.eager, layer=layer_value, sentences=len(ids),
               min_cosine=float(cosine.min()), mean_cosine=float(cosine.mean()))
    if VERSION == 7:  # fla's RWKV7Model on the same weights, last layer (after its final norm), mean-pooled
        model = fla_model7(SHAPE["layers"], args.path)
        with torch.inference_mode():
            vectors = torch.stack([model(input_ids=torch.tensor([s], device="cuda"), use_cache=False).last_hidden_state[0].float()
                                   .mean(0).cpu() for s in ids])
        reference = pooled(cpu, ids, cpu.resolve_layer(-1))
        ours_gpu = pooled(gpu, ids, gpu.resolve_layer(-1))
        for name, other in (("fla bf16 vs ours fp32 (CPU)", reference), ("fla bf16 vs ours bf16", ours_gpu)):
            cosine = torch.nn.functional.cosine_similarity(vectors.double(), other.double(), dim=1)
            record(args, step="parity", compared=name, layer=-1, sentences=len(ids), min_cosine=float(cosine.min()),
                   mean_cosine=float(cosine.mean()))


def flops_per_token(model, blocks: int) -> float:
    """2 × the parameters a token meets in ``blocks`` blocks (all blocks are the same size)."""
    per_block = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.1."))
    return 2.0 * per_block * blocks


def step_ours(args) -> None:
    encoder = load_encoder(args.path, "cuda", fused=not args.eager, batch_tokens=args.batch_tokens,
                           cuda_graphs=not args.no_cuda_graphs)
    weights = torch.cuda.memory_allocated()
    for name, n in WORKLOADS.items():
        ids = sentences(n)
        tokens = sum(map(len, ids))
        for layer_value in (-1, 11):
            layer = encoder.resolve_layer(layer_value)
            torch.cuda.reset_peak_memory_stats()
            seconds = timed(lambda: pooled(encoder, ids, layer), warmup=1, repeats=3, at_least=2.0)
            record(args, step="ours", fused=not args.eager, cuda_graphs=not args.no_cuda_graphs, batch_tokens=args.batch_tokens, workload=name,
                   blocks=layer.block + 1, sentences=n, tokens=tokens, seconds=seconds, tokens_per_second=tokens / seconds,
                   seconds_per_pair=2 * seconds / n, peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30,
                   weights_gib=weights / 2**30, flops_per_token=flops_per_token(encoder.model, layer.block + 1))


def step_first_result(args) -> None:
    """(Child of ``cold``.) Load, encode workload A to pooled vectors twice; print the timings."""
    imported = time.perf_counter()
    import plugins.pooling  # noqa: F401  - the job's own imports
    import plugins.rwkv.encoder  # noqa: F401

    imported = time.perf_counter()
    torch.cuda.init()
    started = time.perf_counter()
    encoder = load_encoder(args.path, "cuda", fused=not args.eager)
    torch.cuda.synchronize()
    loaded = time.perf_counter()
    ids = sentences(WORKLOADS["A"])
    layer = encoder.resolve_layer(-1)
    from plugins.rwkv import fused

    cached = lambda: sum(len(k.device_caches[0][0]) for k in fused.KERNELS) if not args.eager else 0  # noqa: E731
    precompiled = cached()
    pooled(encoder, ids, layer)
    first = time.perf_counter()
    compiled_at_first_encode = cached() - precompiled
    pooled(encoder, ids, layer)
    second = time.perf_counter()
    print("FIRST_RESULT " + json.dumps(dict(imports=imported - STARTED, cuda_init=started - imported, load=loaded - started,
                                            first_encode=first - loaded, second_encode=second - first,
                                            precompiled=precompiled, compiled_at_first_encode=compiled_at_first_encode,
                                            to_first_result=first - imported)), flush=True)


def step_load(args) -> None:
    """Where a fresh process's load time goes: each phase alone, in this process, in order."""
    from plugins.rwkv import checkpoint as ck
    from plugins.rwkv import fused
    from plugins.rwkv.encoder import _fingerprint

    phases = {}

    def phase(name, function):
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = function()
        torch.cuda.synchronize()
        phases[name] = time.perf_counter() - started
        return result

    torch.cuda.init()
    phase("cuda_context", lambda: torch.zeros(1, device="cuda"))
    pinned = phase("pin_64MiB", lambda: torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True))

    def read_file():
        view = memoryview(pinned.numpy())
        with open(args.path, "rb", buffering=0) as handle:
            while handle.readinto(view):
                pass

    phase("read_file_into_pinned", read_file)
    checkpoint = phase("load_checkpoint", lambda: ck.load_checkpoint(str(args.path), device="cuda"))
    phase("fingerprint", lambda: _fingerprint(checkpoint))
    model = phase("build_model", lambda: ck.build_model(checkpoint, torch.device("cuda")))
    phase("precompile", lambda: fused.precompile(model.config, torch.device("cuda")))
    record(args, step="load", file=args.path.suffix, gib=args.path.stat().st_size / 2**30, **phases)


def step_cold(args) -> None:
    """Fresh processes on a page-cached weights file (safetensors, then .pth): compile caches empty, then warm."""
    for path in (args.path.with_suffix(".safetensors"), args.path.with_suffix(".pth")):
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # into the page cache
        with tempfile.TemporaryDirectory() as caches:
            env = dict(os.environ, TRITON_CACHE_DIR=f"{caches}/triton", TORCHINDUCTOR_CACHE_DIR=f"{caches}/inductor",
                       CUDA_CACHE_PATH=f"{caches}/nv")
            for caches_state in ("empty", "warm", "warm"):
                command = [sys.executable, __file__, "first-result", str(path)] + (["--eager"] if args.eager else [])
                spawned = time.perf_counter()
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - spawned
                line = next((l for l in done.stdout.splitlines() if l.startswith("FIRST_RESULT ")), None)
                if line is None:
                    sys.exit(f"cold child failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
                record(args, step="cold", fused=not args.eager, file=path.suffix, caches=caches_state, process_wall=wall,
                       **json.loads(line.split(" ", 1)[1]))


def fla_model7(blocks: int, path: Path):
    """fla's RWKV7Model on our RWKV-7 weights (the same numbers ours runs), bf16, cut to ``blocks``."""
    from fla.models import RWKV7Config, RWKV7Model

    from plugins.rwkv.checkpoint import blinkdl7_to_fla, load_checkpoint

    checkpoint = load_checkpoint(str(path), device="cuda")
    c = checkpoint.config
    state = {k.removeprefix("model."): v.to(torch.bfloat16) for k, v in blinkdl7_to_fla(checkpoint.state).items()
             if k != "lm_head.weight" and not any(k.startswith(f"model.layers.{i}.") for i in range(blocks, c.num_layers))}
    config = RWKV7Config(hidden_size=c.hidden_size, head_dim=c.head_size, num_hidden_layers=blocks, intermediate_size=c.ffn_size,
                         vocab_size=c.vocab_size, decay_low_rank_dim=c.decay_rank, a_low_rank_dim=c.a_rank,
                         v_low_rank_dim=c.v_rank, gate_low_rank_dim=c.gate_rank, norm_eps=c.layer_norm_eps)
    with torch.device("cuda"):
        model = RWKV7Model(config)
    model = model.to(torch.bfloat16)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def fla_model(blocks: int, path: Path | None = None):
    if VERSION == 7:
        return fla_model7(blocks, path)
    from fla.models import RWKV6Config, RWKV6Model

    config = RWKV6Config(hidden_size=SHAPE["hidden"], expand_k=1.0, expand_v=1.0, num_heads=SHAPE["hidden"] // 64,
                         intermediate_size=SHAPE["ffn"], num_hidden_layers=blocks, vocab_size=SHAPE["vocab"],
                         proj_low_rank_dim=32, gate_low_rank_dim=64, attn_mode="chunk")
    return RWKV6Model(config).to("cuda", torch.bfloat16).eval().requires_grad_(False)


def fla_packs(ids: list[list[int]], bucket: int = 8192) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sentences back to back in packs of ≤ FLA_PACK tokens; each pack's length rounded up to a
    multiple of ``bucket`` by one filler sequence (not counted), so fla compiles few shapes."""
    packs, current = [], []
    for sentence in ids:
        if current and sum(map(len, current)) + len(sentence) > FLA_PACK:
            packs.append(current)
            current = []
        current.append(sentence)
    packs.append(current)
    out = []
    for pack in packs:
        total = sum(map(len, pack))
        filler = -total % bucket
        lengths = [len(s) for s in pack] + ([filler] if filler else [])
        tokens = torch.tensor([t for s in pack for t in s] + [0] * filler).cuda()[None]
        cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32).cuda()
        out.append((tokens, cu))
    return out


def step_fla(args) -> None:
    for blocks in (24, 12):
        model = fla_model(blocks, args.path)
        weights = torch.cuda.memory_allocated()
        for name, n in WORKLOADS.items():
            ids = sentences(n)
            tokens = sum(map(len, ids))
            packs = fla_packs(ids)

            def packed_run():
                with torch.inference_mode():
                    for input_ids, cu in packs:
                        model(input_ids=input_ids, cu_seqlens=cu, use_cache=False)

            torch.cuda.reset_peak_memory_stats()
            seconds = timed(packed_run, warmup=1, repeats=3, at_least=2.0)  # the warm-up compiles every bucketed shape
            record(args, step="fla", mode="packed", workload=name, blocks=blocks, sentences=n, tokens=tokens, seconds=seconds,
                   tokens_per_second=tokens / seconds, peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30,
                   weights_gib=weights / 2**30, packs=len(packs))
        if blocks == 24 and not args.skip_padded:
            ids = sentences(WORKLOADS["B"])
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
            batches = []
            for start in range(0, len(order), args.fla_batch):
                chosen = [ids[i] for i in order[start:start + args.fla_batch]]
                padded = torch.zeros(args.fla_batch, -(-max(map(len, chosen)) // 16) * 16, dtype=torch.long)
                for row, sentence in enumerate(chosen):
                    padded[row, : len(sentence)] = torch.tensor(sentence)
                batches.append(padded.cuda())

            def padded_run():
                with torch.inference_mode():
                    for input_ids in batches:
                        model(input_ids=input_ids, use_cache=False)

            seconds = timed(padded_run, warmup=1, repeats=2)
            record(args, step="fla", mode=f"padded batches of {args.fla_batch}", workload="B", blocks=24, sentences=len(ids),
                   tokens=sum(map(len, ids)), seconds=seconds, tokens_per_second=sum(map(len, ids)) / seconds)
        del model
        torch.cuda.empty_cache()


def step_profile(args) -> None:
    """Where the GPU time goes: kernels of 24-block forwards over workload B's first 3,000 sentences."""
    from torch.profiler import ProfilerActivity, profile

    encoder = load_encoder(args.path, "cuda", fused=not args.eager)
    ids = sentences(WORKLOADS["B"])[:3000]
    layer = encoder.resolve_layer(-1)
    from plugins.rwkv import encoder as encoder_module

    for ahead in (1, 2, 0):
        encoder_module.PACKS_AHEAD = ahead
        wall = timed(lambda: pooled(encoder, ids, layer), warmup=1, repeats=3)
        print(f"{ahead} pack(s) queued ahead: {wall * 1e3:.1f} ms")
    encoder_module.PACKS_AHEAD = 1
    lengths = np.array([len(s) for s in ids])
    pack = next(encoder_module._packs(np.argsort(-lengths, kind="stable"), lengths, 8192))
    with torch.cuda.stream(torch.cuda.Stream()):
        for _ in range(3):
            torch.cuda.synchronize()
            started = time.perf_counter()
            encoder._forward(pack, ids, lengths, layer.index, torch.device("cuda"))
            queued = time.perf_counter()
            torch.cuda.synchronize()
            print(f"one pack of {lengths[pack].sum()} tokens: host queues it in {1e3 * (queued - started):.1f} ms, "
                  f"GPU done {1e3 * (time.perf_counter() - started):.1f} ms after the start")
    wall = timed(lambda: pooled(encoder, ids, layer), warmup=1, repeats=3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        pooled(encoder, ids, layer)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    print(f"GPU busy {total / 1e3:.1f} ms for {sum(map(len, ids))} tokens; wall {wall * 1e3:.1f} ms unprofiled "
          f"(GPU idle {100 * max(0.0, 1 - total / 1e6 / wall):.0f}%)")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:14]:
        print(f"{100 * e.self_device_time_total / total:5.1f}%  {e.self_device_time_total / 1e3:8.2f} ms  {e.count:6d}×  {e.key[:90]}")
    from torch.autograd import DeviceType

    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    gaps = [(b.time_range.start - a.time_range.end, a.name, b.name) for a, b in zip(kernels, kernels[1:])]
    idle = [g for g in gaps if g[0] > 0]
    print(f"between GPU ops: {sum(g[0] for g in idle) / 1e3:.1f} ms idle in {len(idle)} gaps; "
          f"{sum(g[0] for g in idle if g[0] > 20) / 1e3:.1f} ms in {sum(g[0] > 20 for g in idle)} gaps over 20 µs; longest:")
    for gap, before, after in sorted(idle, reverse=True)[:6]:
        print(f"  {gap / 1e3:7.2f} ms after {before[:50]} before {after[:50]}")


def step_matmul(args) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    seconds = timed(lambda: a @ b, warmup=3, repeats=10)
    record(args, step="matmul", tflops=2 * 8192**3 / seconds / 1e12)


def step_tune(args) -> None:
    """Time each fused kernel's launch choices on workload B's first pack; print (and --write) the best."""
    import triton
    import triton.testing

    from plugins.rwkv import fused
    from plugins.rwkv.model import Packed, _layer_norm

    encoder = load_encoder(args.path, "cuda")
    model = encoder.model
    ids = sentences(WORKLOADS["B"])[:700]
    lengths = torch.tensor([len(s) for s in ids])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).cuda()
    tokens = torch.tensor([t for s in ids for t in s]).cuda()
    x = _layer_norm(model.blocks[0].ln0, model.emb(tokens).float())
    T, C = x.shape
    is_start = Packed(cu, T).is_start.view(torch.uint8)
    att, norm = model.blocks[0].att, model.blocks[0].ln1
    H, N = att.time_faaaa.shape
    stats = torch.empty(T, 2, device="cuda")
    maa5 = torch.randn(5, C, device="cuda")
    lora = torch.randn(T, 160, device="cuda", dtype=torch.bfloat16)
    mixes = torch.empty(5, T, C, device="cuda", dtype=torch.bfloat16)
    r, k, v, wd, g = (torch.randn(T, C, device="cuda", dtype=torch.bfloat16) for _ in range(5))
    y = torch.empty_like(r)
    best = {}

    def pick(name, choices, launch, keep=True):
        timings = {}
        for choice in choices:
            ms = triton.testing.do_bench(lambda: launch(**choice), return_mode="median")
            timings[json.dumps(choice)] = ms
            record(args, step="tune", kernel=name, tokens=T, choice=choice, ms=ms)
        if keep:
            best.update(json.loads(min(timings, key=timings.get)))

    bf = torch.randn(2, T, C, device="cuda", dtype=torch.bfloat16)
    x_out = torch.empty_like(x)
    pick("ln_shift_mix", [{"row_warps": w, "row_block": rows} for w in (4, 8) for rows in (1, 2, 4, 8)],
         lambda row_warps, row_block: fused._ln_shift_mix[(triton.cdiv(T, row_block),)](
             x, x_out, bf[0], bf[1], bf[1], is_start, norm.weight, norm.bias, maa5, mixes, stats, T, 1e-5, C=C, BLOCK_C=C,
             ROWS=row_block, ADD_MODE=2, WRITE_X=True, NUM_MIX=1, WRITE_STATS=True, num_warps=row_warps))
    pick("ln_shift_mix, ffn side (x + attention's output used, not stored; mixes k, r)",
         [{"ffn_row_warps": w, "ffn_row_block": rows} for w in (4, 8) for rows in (1, 2, 4, 8)],
         lambda ffn_row_warps, ffn_row_block: fused._ln_shift_mix[(triton.cdiv(T, ffn_row_block),)](
             x, x, bf[0], x, x, is_start, norm.weight, norm.bias, maa5, mixes, x, T, 1e-5, C=C, BLOCK_C=C,
             ROWS=ffn_row_block, ADD_MODE=1, WRITE_X=False, NUM_MIX=2, WRITE_STATS=False, num_warps=ffn_row_warps))
    pick("lerp5", [{"lerp_rows": bt, "lerp_cols": bc, "lerp_warps": w} for bt in (16, 32, 64) for bc in (64, 128, 256) for w in (4, 8)],
         lambda lerp_rows, lerp_cols, lerp_warps: fused._lerp5[(triton.cdiv(T, lerp_rows), triton.cdiv(C, lerp_cols))](
             x, stats, is_start, norm.weight, norm.bias, lora, att.time_maa_w2, maa5, mixes, T, C=C, RANK=32,
             BT=lerp_rows, BC=lerp_cols, DOT_BF16=True, num_warps=lerp_warps))
    pick("lerp5 with a tf32 dot", [{"lerp_rows": bt, "lerp_cols": bc, "lerp_warps": 4} for bt, bc in ((16, 128), (64, 64), (32, 128))],
         lambda lerp_rows, lerp_cols, lerp_warps: fused._lerp5[(triton.cdiv(T, lerp_rows), triton.cdiv(C, lerp_cols))](
             x, stats, is_start, norm.weight, norm.bias, lora, att.time_maa_w2, maa5, mixes, T, C=C, RANK=32,
             BT=lerp_rows, BC=lerp_cols, DOT_BF16=False, num_warps=lerp_warps), keep=False)
    scratch = torch.empty(T, C, device="cuda")

    pick("wkv", [{"wkv_block": b, "wkv_warps": w} for b in (16, 32, 64) for w in (1, 2)],
         lambda wkv_block, wkv_warps: fused._wkv_steps[(len(ids), H)](
             r, k, v, wd, att.time_decay.view(-1), att.time_faaaa, g, att.ln_x.weight, att.ln_x.bias, y, scratch, cu,
             cu.new_full((1,), len(ids)), torch.zeros(H, dtype=torch.int32, device="cuda"), att.ln_x.eps, H=H, N=N,
             BT=wkv_block, num_warps=wkv_warps))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    pick("wkv in a CUDA graph (programs per head share the sentences)", [{"wkv_programs_per_sm": p} for p in (4, 6, 8, 12, 16)],
         lambda wkv_programs_per_sm: fused._wkv_steps[(-(-sms * wkv_programs_per_sm // H), H)](
             r, k, v, wd, att.time_decay.view(-1), att.time_faaaa, g, att.ln_x.weight, att.ln_x.bias, y, scratch, cu,
             cu.new_full((1,), len(ids)), torch.zeros(H, dtype=torch.int32, device="cuda"), att.ln_x.eps, H=H, N=N,
             BT=best["wkv_block"], num_warps=best["wkv_warps"]))
    big = torch.randn(T, SHAPE["ffn"], device="cuda", dtype=torch.bfloat16)
    pick("relu_square", [{"elementwise_block": b, "elementwise_warps": w} for b in (1024, 4096) for w in (4, 8)],
         lambda elementwise_block, elementwise_warps: fused._relu_square[(triton.cdiv(big.numel(), elementwise_block),)](
             big, big.numel(), BLOCK=elementwise_block, num_warps=elementwise_warps))
    xk, key_weight = torch.randn(8192, C, device="cuda", dtype=torch.bfloat16), model.blocks[0].ffn.key.weight  # a default pack
    tiles = [(128, 256, 64, 4, 8, 8), (128, 256, 64, 3, 8, 8), (128, 256, 64, 4, 8, 16), (128, 128, 64, 4, 8, 8),
             (256, 128, 64, 4, 8, 8)]
    pick("ffn key + relu² (cuBLAS + relu_square, or one Triton matmul)", [{"key_matmul": "cublas"}] + [
        dict(key_matmul="triton", key_rows=bm, key_cols=bn, key_depth=bk, key_stages=st, key_warps=w, key_group=g)
        for bm, bn, bk, st, w, g in tiles],
         lambda **choice: fused.relu_square_key(xk, key_weight, {**fused.launch_choices((0, 0)), **best, **choice}))
    family = "sm_{}{}".format(*torch.cuda.get_device_capability())
    print(json.dumps({family: best}))
    if args.write:
        table = json.loads(fused.LAUNCH_FILE.read_text())
        table[family] = best
        fused.LAUNCH_FILE.write_text(json.dumps(table, indent=2) + "\n")


def step_official(args) -> None:
    os.environ["RWKV_JIT_ON"] = "1"
    os.environ["RWKV_CUDA_ON"] = "1"
    from rwkv.model import RWKV

    model = RWKV(model=str(args.path).removesuffix(".pth"), strategy="cuda bf16")
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
    record(args, step="official", strategy="cuda bf16", sentences=len(ids), tokens=tokens, seconds=seconds,
           tokens_per_second=tokens / seconds)


def step_all(args) -> None:
    """One run: every figure of the report on this machine, then the report of this run."""
    if not args.path.exists():
        step_weights(args)
    steps = [["matmul"], ["cold"], ["ours"], ["ours", "--no-cuda-graphs"], ["ours", "--batch-tokens", "16384"], ["parity"], ["fla"]]
    if VERSION == 7:  # no CUDA graphs of ours for RWKV-7
        steps = [["matmul"], ["cold"], ["ours"], ["ours", "--batch-tokens", "16384"], ["parity"], ["fla", "--skip-padded"]]
    for step in steps:
        command = [sys.executable, __file__, step[0], str(args.path), "--results", str(args.results), "--run", args.run, *step[1:],
                   "--version", str(VERSION)]
        done = subprocess.run(command + (["--skip-padded"] if args.skip_padded else []))
        if done.returncode:
            print(f"step {' '.join(step)} failed (exit {done.returncode}); the report shows the others", flush=True)
    step_report(args)


def step_report(args) -> None:
    figures = [json.loads(line) for line in open(args.results)]
    run = args.run if any(f.get("run") == args.run for f in figures) else figures[-1].get("run")
    latest = {}
    for f in figures:  # the latest figure of each kind in this run
        if f.get("run") == run:
            key = json.dumps([f.get(k) for k in ("step", "mode", "workload", "blocks", "caches", "file", "layer", "fused", "batch_tokens",
                                                 "kernel", "choice", "cuda_graphs")])
            latest[key] = f
    figures = list(latest.values())
    by = lambda **kw: [f for f in figures if all(f.get(k) == v for k, v in kw.items())]  # noqa: E731
    matmul = max((f["tflops"] for f in by(step="matmul")), default=None)
    peers = {(f["workload"], f["blocks"]): f for f in by(step="fla", mode="packed")}
    print(f"run {run}; bf16 matmul roofline {matmul:.0f} TFLOP/s" if matmul else f"run {run}; no matmul figure")
    print("| measurement | tokens/s | seconds | × fla packed | % of roofline | peak GPU memory |\n| --- | --- | --- | --- | --- | --- |")
    for f in by(step="ours") + by(step="fla"):
        peer = peers.get((f["workload"], f["blocks"]))
        flops = next((o["flops_per_token"] for o in by(step="ours") if o["blocks"] == f["blocks"]), None)
        roof = f"{100 * f['tokens_per_second'] * flops / (matmul * 1e12):.0f}%" if matmul and flops else ""
        memory = f"{f['peak_gpu_gib']:.2f} GiB (weights {f['weights_gib']:.2f})" if "peak_gpu_gib" in f else ""
        graphs = ", no CUDA graphs" if f.get("cuda_graphs") is False else ""
        name = (f"layerprobe ({'fused' if f.get('fused', True) else 'eager'}{graphs}, packs of {f.get('batch_tokens') or 8192} tokens)"
                if f["step"] == "ours" else f"fla RWKV6Model ({f['mode']})")
        ratio = f"{f['tokens_per_second'] / peer['tokens_per_second']:.2f}×" if peer else ""
        print(f"| {name}, workload {f['workload']}, {f['blocks']} blocks | {f['tokens_per_second']:,.0f} | {f['seconds']:.3f} | "
              f"{ratio} | {roof} | {memory} |")
    for f in by(step="official"):
        print(f"| official rwkv ({f['strategy']}, 1 sentence/call) | {f['tokens_per_second']:,.0f} | {f['seconds']:.2f} | "
              f"{f['tokens_per_second'] / peers[('B', 24)]['tokens_per_second']:.3f}× | | |" if ("B", 24) in peers else "")
    cold = by(step="cold")
    if cold:
        print("\n| fresh process, workload A | imports | CUDA init | load | first encode | second encode | to first result (excl. imports) |\n"
              "| --- | --- | --- | --- | --- | --- | --- |")
        for f in cold:
            print(f"| {f.get('file', '')} weights, compile caches {f['caches']} ({f.get('compiled_at_first_encode', '?')} kernels compiled at the first encode) | {f['imports']:.2f} s | {f['cuda_init']:.2f} s | {f['load']:.2f} s | "
                  f"{f['first_encode']:.2f} s | {f['second_encode']:.3f} s | {f['to_first_result']:.2f} s |")
    for f in by(step="parity"):
        print(f"parity, bf16 CUDA ({'fused' if f.get('fused', True) else 'eager'}) vs fp32 CPU, layer {f['layer']}: "
              f"min pooled cosine {f['min_cosine']:.5f} over {f['sentences']} sentences")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["all", "weights", "matmul", "cold", "first-result", "load", "ours", "fla", "parity",
                                         "tune", "profile", "official", "report"])
    parser.add_argument("path", nargs="?", type=Path, default=Path("/tmp/rwkv1b6.safetensors"),
                        help="weights (the weights step writes both this .safetensors and a .pth beside it)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "rwkv_gpu.jsonl")
    parser.add_argument("--run", default=time.strftime("%Y%m%d-%H%M%S"), help="a label shared by one run's figures")
    parser.add_argument("--official-sentences", type=int, default=300)
    parser.add_argument("--fla-batch", type=int, default=256)
    parser.add_argument("--skip-padded", action="store_true", help="fla: only its packed mode (the peer that counts)")
    parser.add_argument("--batch-tokens", type=int, default=None, help="ours: tokens per packed forward")
    parser.add_argument("--eager", action="store_true", help="ours/cold/parity: plain PyTorch between matmuls (encoder.fused=false)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="ours: queue each pack's kernels from Python (encoder.cuda_graphs=false)")
    parser.add_argument("--write", action="store_true", help="tune: store the best choices in plugins/rwkv/launch.json")
    parser.add_argument("--version", type=int, choices=(6, 7), default=6, help="7: RWKV-7 weights, fla's RWKV7Model as the peer")
    args = parser.parse_args()
    global VERSION
    VERSION = args.version
    if VERSION == 7:
        SHAPE["ffn"] = 4 * SHAPE["hidden"]
    globals()[f"step_{args.step.replace('-', '_')}"](args)


if __name__ == "__main__":
    main()
