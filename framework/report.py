"""``python -m framework.report``: the layer-wise table and plot, rebuilt from MLflow runs.

Rows are encoder/pooler (per dataset), columns are layers, cells are the metric with its 95% CI,
plus time per pair and peak memory. Reads the MLflow store only, never the jobs' output folders.

    python -m framework.report --experiment layerprobe [--parent RUN_ID] [--metric spearman] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from framework.errors import LayerprobeError


def layer_table(rows, metric: str) -> tuple[list[str], list[list[str]]]:
    """Rows encoder/pooler/dataset × columns layers (cells: metric [CI]), then cost columns."""
    finished = [r for r in rows if r.status == "FINISHED" and metric in r.metrics]
    layers = sorted({r.layer for r in finished}, key=lambda l: (l != "-", int(l) if l.lstrip("-").isdigit() else 0))
    groups: dict[tuple[str, str, str], dict[str, object]] = {}
    for row in finished:
        groups.setdefault((row.encoder, row.pooler, f"{row.dataset}/{row.split}"), {})[row.layer] = row
    header = ["encoder", "pooler", "dataset", *(f"layer {l}" for l in layers), "ms_per_pair", "peak_memory_mb"]
    body = []
    for (encoder, pooler, dataset), by_layer in sorted(groups.items()):
        runs = list(by_layer.values())
        per_pair = [1000 / r.metrics["pairs_per_second"] for r in runs if r.metrics.get("pairs_per_second")]
        memory = [r.metrics.get("peak_gpu_memory_mb", r.metrics.get("peak_rss_mb")) for r in runs]
        memory = [m for m in memory if m is not None]
        body.append([encoder, pooler, dataset, *(by_layer[l].metric_text(metric) if l in by_layer else "" for l in layers),
                     f"{sum(per_pair) / len(per_pair):.4f}" if per_pair else "", f"{max(memory):.0f}" if memory else ""])
    return header, body


def build_report(tracking_uri: str, experiment: str, parent: str | None, metric: str, out: Path) -> str:
    from mlflow.tracking import MlflowClient

    from framework.summary import child_runs, markdown, plot_metrics_by_layer, run_rows, write_csv

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise LayerprobeError(f"no MLflow experiment '{experiment}' in {tracking_uri} (experiments there: {known})")
    if parent:
        try:
            runs = child_runs(client, parent)
        except Exception:  # MLflow raises its own exception for an unknown run id
            raise LayerprobeError(f"no run '{parent}' in {tracking_uri}; give the id of a sweep's parent run") from None
    else:
        runs = [r for r in client.search_runs([found.experiment_id], max_results=50000) if "layer_index" in r.data.params]
    rows = run_rows(runs)
    if not any(r.status == "FINISHED" and metric in r.metrics for r in rows):
        raise LayerprobeError(f"experiment '{experiment}'{f' (parent {parent})' if parent else ''} has no finished run with '{metric}'")
    header, body = layer_table(rows, metric)
    table = markdown(header, body)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(table, encoding="utf-8")
    write_csv(header, body, out / "report.csv")
    plot_metrics_by_layer([r for r in rows if r.status == "FINISHED"], out / "report.png")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m framework.report", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="layerprobe")
    parser.add_argument("--parent", help="only the jobs of this sweep (its parent run id)")
    parser.add_argument("--metric", default="spearman")
    parser.add_argument("--tracking-uri", help="default: sqlite:///<tracking-dir>/mlflow.db")
    parser.add_argument("--tracking-dir", default="mlruns")
    parser.add_argument("--out", type=Path, default=Path("mlruns") / "report")
    args = parser.parse_args(argv)
    database = Path(args.tracking_dir).expanduser().resolve() / "mlflow.db"
    if not args.tracking_uri and not database.is_file():
        print(f"layerprobe: error: no MLflow store at {database}; run a job first or pass --tracking-dir/--tracking-uri", file=sys.stderr)
        raise SystemExit(2)
    try:
        print(build_report(args.tracking_uri or f"sqlite:///{database}", args.experiment, args.parent, args.metric, args.out), end="")
    except LayerprobeError as error:
        print(f"layerprobe: error: {error}", file=sys.stderr)
        raise SystemExit(2)
    print(f"\n(also {args.out / 'report.csv'} and {args.out / 'report.png'})")


if __name__ == "__main__":
    main()
