"""Encoder work shared across a sweep: 9 jobs (layers 1,3,5 × poolers mean,attn,last) against layer 5 alone.

    python benchmarks/sweep_cache.py [--data-dir ../shared/data/glue/MRPC] [--layers 8 --hidden 128]

Runs, on CPU with a random RWKV-6 checkpoint: (1) layer 5 alone with an empty cache, (2) the
9-job sweep with an empty cache, (3) the same sweep again. Prints the summed encode_seconds of
each (read back from MLflow) and the cache hits of the repeat.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from plugins.rwkv.random_checkpoint import random_state  # noqa: E402


def run(store: Path, *overrides: str) -> list:
    from mlflow.tracking import MlflowClient

    done = subprocess.run([sys.executable, "-m", "framework", "-m", f"tracking.dir={store}", *overrides],
                          cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit("\n".join(l for l in done.stderr.splitlines() if "layerprobe" in l or "Error" in l)[-3000:])
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("layerprobe")
    return [r for r in client.search_runs([experiment.experiment_id], max_results=1000) if "layerprobe.layer" in r.data.tags]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue" / "MRPC"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        torch.save(random_state(args.layers, args.hidden, args.hidden * 7 // 2, 65536), folder / "model.pth")
        common = ["encoder=rwkv", f"encoder.model={folder / 'model.pth'}", "dataset=mrpc", f"dataset.data_dir={args.data_dir}",
                  "metric=spearman"]
        alone = run(folder / "alone", *common, "layer=5", "pooler=mean")
        sweep_args = [*common, "layer=1,3,5", "pooler=mean,attn,last"]
        sweep = run(folder / "sweep", *sweep_args)
        repeat = [r for r in run(folder / "sweep", *sweep_args) if r.info.run_id not in {s.info.run_id for s in sweep}]
    seconds = lambda runs: sum(r.data.metrics["encode_seconds"] for r in runs)  # noqa: E731
    print(f"RWKV-6 random {args.layers}×{args.hidden}, MRPC validation ({alone[0].data.metrics['n_pairs']:.0f} pairs), CPU")
    print(f"  layer 5 alone, empty cache        : encode_seconds {seconds(alone):.2f}")
    print(f"  9-job sweep, empty cache          : summed encode_seconds {seconds(sweep):.2f} "
          f"= {seconds(sweep) / seconds(alone):.2f}× layer 5 alone (target ≤ 1.3)")
    print(f"    misses {sum(r.data.metrics.get('encoder.cache_misses', 0) for r in sweep):.0f}, "
          f"resumed {sum(r.data.metrics.get('encoder.cache_resumed', 0) for r in sweep):.0f}, "
          f"hits {sum(r.data.metrics.get('encoder.cache_hits', 0) for r in sweep):.0f} "
          "(every encode of the 9 jobs: validation, and the train split attn fits on)")
    hits = sum(r.data.metrics.get("encoder.cache_hits", 0) >= 1 and "encoder.cache_misses" not in r.data.metrics for r in repeat)
    print(f"  same sweep again                  : {hits} of {len(repeat)} jobs served from the disk cache, "
          f"summed encode_seconds {seconds(repeat):.2f}")


if __name__ == "__main__":
    main()
