"""RWKV-6 / RWKV-7 on a laptop-class CPU: layerprobe against BlinkDL's official runtime, same random weights.

    python benchmarks/rwkv_cpu.py [--layers 12 --hidden 768] [--sentences N]
    python benchmarks/rwkv_cpu.py --version 7 [--sentences N]     # RWKV-7 (x070), the official runtime's RWKV_V7_ON=1

Weights: random, of the 0.1B shape (12 blocks, hidden 768, world vocabulary; FFN 2688 for RWKV-6,
3072 for RWKV-7).
Sentences: the distinct sentences of MRPC validation (../shared/data/glue/MRPC/dev.tsv), tokenised
with the world tokenizer. layerprobe encodes all of them to the last layer (packed batches, float32);
the official runtime (``cpu fp32``, JIT off) runs one sentence per call, as a user of it would. Both
run in this process, one after the other; the WKV share is layerprobe's time inside ``wkv6``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")


def mrpc_sentences(limit: int | None) -> list[str]:
    from plugins.glue import MRPC, GlueDataset, GlueOptions

    folder = REPO.parent / "shared" / "data" / "glue" / "MRPC"
    if not folder.is_dir():
        sys.exit(f"needs {folder} (the MRPC validation sentences)")
    pairs = GlueDataset(MRPC, GlueOptions(data_dir=str(folder))).load("validation")
    return pairs.unique_sentences()[0][:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--sentences", type=int, default=None, help="first N distinct sentences (default: all)")
    parser.add_argument("--skip-official", action="store_true")
    parser.add_argument("--version", type=int, choices=(6, 7), default=6)
    parser.add_argument("--reference-wkv", action="store_true",
                        help="also time layerprobe with the step-by-step WKV (the CPU path before the chunked one)")
    args = parser.parse_args()
    if args.version == 7:
        os.environ["RWKV_V7_ON"] = "1"  # read when the official runtime is imported

    from plugins.rwkv import wkv
    from plugins.rwkv.encoder import RWKVEncoder, RWKVOptions
    from plugins.rwkv.random_checkpoint import random_state
    from plugins.rwkv.tokenizer import WorldTokenizer

    sentences = mrpc_sentences(args.sentences)
    ids = WorldTokenizer().encode_batch(sentences)
    tokens = sum(map(len, ids))
    print(f"{len(sentences)} sentences, {tokens:,} tokens; torch threads {torch.get_num_threads()}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rwkv.pth"
        if args.version == 7:
            from plugins.rwkv.random_checkpoint import random_state7

            torch.save(random_state7(args.layers, args.hidden, None, 65536), path)
        else:
            torch.save(random_state(args.layers, args.hidden, args.hidden * 7 // 2, 65536), path)

        encoder = RWKVEncoder(RWKVOptions(model=str(path), device="cpu", progress=False))
        layer = encoder.resolve_layer(None)
        wkv_seconds = [0.0]
        original = wkv.wkv6_chunked if args.version == 6 else encoder.model.blocks[0].att.wkv

        list(encoder.encode_tokens(ids[:8], layer))  # load, warm up

        def install(function):
            if args.version == 6:
                wkv.wkv6_chunked = function
            else:
                for block in encoder.model.blocks:
                    block.att.wkv = function

        def run(kernel, name):
            wkv_seconds[0] = 0.0
            install(lambda *a, **k: timed(kernel, *a, **k))
            started = time.perf_counter()
            for _batch in encoder.encode_tokens(ids, layer):
                pass
            seconds = time.perf_counter() - started
            install(original)
            print(f"{name}: {seconds:7.2f} s  ({tokens / seconds:,.0f} tokens/s), WKV {wkv_seconds[0]:.2f} s = "
                  f"{100 * wkv_seconds[0] / seconds:.0f}% of the encode", flush=True)
            return seconds

        def timed(kernel, *a, **k):
            started = time.perf_counter()
            result = kernel(*a, **k)
            wkv_seconds[0] += time.perf_counter() - started
            return result

        ours = run(original, "layerprobe (chunked WKV)      " if args.version == 6 else "layerprobe (packed, step WKV) ")
        if args.reference_wkv and args.version == 6:
            run(wkv.wkv6_reference, "layerprobe (step-by-step WKV) ")
        if args.skip_official:
            return
        from rwkv.model import RWKV

        model = RWKV(model=str(path).removesuffix(".pth"), strategy="cpu fp32")
        model.forward(ids[0], None)
        started = time.perf_counter()
        for sentence in ids:
            if sentence:
                model.forward(sentence, None)
        official = time.perf_counter() - started
        print(f"official runtime (cpu fp32)    : {official:7.2f} s  ({tokens / official:,.0f} tokens/s), one sentence per call", flush=True)
        print(f"layerprobe is {official / ours:.2f}x the official runtime (target ≥ 2x; WKV target ≤ 15% of the encode)")


if __name__ == "__main__":
    main()
