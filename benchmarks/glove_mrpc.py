"""GloVe + mean pooling + cosine on MRPC validation: µs per pair, and one whole CLI job's wall time.

    python benchmarks/glove_mrpc.py [--data-dir ../shared/data/glue/MRPC] [--repeats 50]

The peer, in the same run, is the paper's protocol written the obvious way (a Python loop over
pairs with numpy), so the ratio says what the harness's batching buys on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from framework.data import Layer  # noqa: E402
from framework.run import score_pairs  # noqa: E402
from plugins.glove import GloveEncoder, GloveOptions  # noqa: E402
from plugins.glue import MRPC, GlueDataset, GlueOptions  # noqa: E402
from plugins.pooling import MeanPooler  # noqa: E402


def per_pair_loop(pairs, vectors) -> np.ndarray:
    """The paper's protocol, pair by pair: lowercase, whitespace split, mean, cosine."""
    matrix, index = vectors.matrix.numpy(), vectors.index

    def embed(sentence):
        ids = [index[t] for t in sentence.lower().split() if t in index]
        return matrix[ids].mean(0) if ids else np.zeros(matrix.shape[1], np.float32)

    scores = []
    for a, b in zip(pairs.sentences_a, pairs.sentences_b):
        u, v = embed(a), embed(b)
        scores.append(float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v) or 1.0)))
    return np.array(scores)


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue" / "MRPC"))
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    pairs = GlueDataset(MRPC, GlueOptions(data_dir=args.data_dir)).load("validation")
    encoder, pooler = GloveEncoder(GloveOptions()), MeanPooler()
    ours = score_pairs(pairs, encoder, pooler, Layer())[0].scores  # loads vectors, warms up
    peer = per_pair_loop(pairs, encoder.vectors)
    assert np.allclose(ours, peer, atol=1e-5), "the two implementations disagree"

    ours_s = timed(lambda: score_pairs(pairs, encoder, pooler, Layer()), args.repeats)
    peer_s = timed(lambda: per_pair_loop(pairs, encoder.vectors), args.repeats)
    n = len(pairs)
    print(f"MRPC validation, {n} pairs, median of {args.repeats}")
    print(f"  layerprobe glove+mean+cosine: {ours_s / n * 1e6:8.2f} µs/pair  (target ≤ 20; the paper: 600)")
    print(f"  per-pair numpy loop (peer)  : {peer_s / n * 1e6:8.2f} µs/pair  (ratio peer/ours: {peer_s / ours_s:.1f}×)")

    with tempfile.TemporaryDirectory() as store:
        command = [sys.executable, "-m", "framework", "encoder=glove", "pooler=mean", "dataset=mrpc",
                   f"dataset.data_dir={args.data_dir}", f"tracking.dir={store}"]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - started
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, mlflow, hydra, scipy"], check=True)
        imports = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"CLI job failed: {done.stderr.strip().splitlines()[-1]}")
    print(f"  whole CLI job (start-up, train-split calibration, 6 metrics × 1000 bootstrap, MLflow): {wall:.2f} s wall (target ≤ 15)")
    print(f"  of which bare imports of torch+mlflow+hydra+scipy (peer): {imports:.2f} s")
    print(f"  result: {done.stdout.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
