"""Tables and plots built from MLflow runs: the sweep summary (and, later, the report)."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

METRIC_ORDER = ("spearman", "pearson", "roc_auc", "average_precision", "accuracy", "f1")


@dataclass
class RunRow:
    """One job's run, reduced to what a results table shows."""

    run_id: str
    status: str
    encoder: str
    pooler: str
    dataset: str
    split: str
    layer: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    job: int | None = None
    versus_reference: str = ""

    @property
    def config(self) -> str:
        return f"{self.encoder}/{self.pooler}"

    @property
    def layer_number(self) -> int | None:
        return int(self.layer) if self.layer.lstrip("-").isdigit() else None

    def metric_text(self, name: str) -> str:
        value = self.metrics.get(name)
        if value is None or math.isnan(value):
            return ""
        low, high = self.metrics.get(f"{name}_ci_low"), self.metrics.get(f"{name}_ci_high")
        return f"{value:.4f}" + (f" [{low:.4f}, {high:.4f}]" if low is not None else "")


def run_rows(runs: list[Run]) -> list[RunRow]:
    rows = []
    for run in runs:
        params, tags = run.data.params, run.data.tags
        rows.append(RunRow(
            run.info.run_id, run.info.status,
            _encoder_label(params), params.get("pooler.name", "?"),
            params.get("dataset.name", "?"), params.get("dataset.split", "?"),
            _layer(params), dict(run.data.metrics), tags.get("error", ""),
            int(tags["layerprobe.job"]) if tags.get("layerprobe.job", "").isdigit() else None,
        ))
    return sorted(rows, key=lambda r: (r.dataset, r.encoder, r.pooler, r.layer_number if r.layer_number is not None else -1))


def _encoder_label(params: dict[str, str]) -> str:
    """The encoder's name; for model-agnostic encoders (hf, rwkv) also which model."""
    name = params.get("encoder.name", "?")
    model = params.get("encoder.model")
    if name in ("hf", "rwkv") and model:
        return f"{name}:{model.removeprefix('package:').rstrip('/').rsplit('/', 1)[-1]}"
    return name


def _layer(params: dict[str, str]) -> str:
    """The resolved layer of a finished run, else the layer the config asked for."""
    layer = params.get("layer_index", params.get("layer", "?"))
    return "-" if layer in ("null", "None") else layer


def metric_names(rows: list[RunRow]) -> list[str]:
    present = {name for row in rows for name in row.metrics}
    return [name for name in METRIC_ORDER if name in present]


def summary_table(rows: list[RunRow]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-run summary: config, layer, metrics with CIs, cost."""
    names = metric_names(rows)
    paired = any(row.versus_reference for row in rows)
    header = ["encoder", "pooler", "dataset", "layer", *names, *(["Δspearman vs reference"] if paired else []),
              "n", "ms_per_pair", "peak_memory_mb", "status"]
    body = []
    for row in rows:
        per_second = row.metrics.get("pairs_per_second")
        memory = row.metrics.get("peak_gpu_memory_mb", row.metrics.get("peak_rss_mb"))
        body.append([
            row.encoder, row.pooler, f"{row.dataset}/{row.split}", row.layer,
            *(row.metric_text(n) for n in names),
            *([row.versus_reference] if paired else []),
            str(int(row.metrics["n_pairs"])) if "n_pairs" in row.metrics else "",
            f"{1000 / per_second:.4f}" if per_second else "",
            f"{memory:.0f}" if memory is not None else "",
            row.status if not row.error else f"{row.status}: {row.error[:120]}",
        ])
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, body)]) + "\n"


def write_csv(header: list[str], body: list[list[str]], path: Path) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(body)


def plot_metrics_by_layer(rows: list[RunRow], path: Path) -> None:
    """One panel per metric, x = layer, one line per encoder/pooler (and dataset, if several).

    Encoders without layers (GloVe) are drawn as dashed horizontal lines: a baseline.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = metric_names(rows) or ["spearman"]
    finished = [r for r in rows if r.status == "FINISHED"]
    several_datasets = len({r.dataset for r in finished}) > 1
    columns = min(3, len(names))
    rows_of_panels = -(-len(names) // columns)
    figure, axes = plt.subplots(rows_of_panels, columns, figsize=(5.5 * columns, 4 * rows_of_panels), squeeze=False)
    for axis in axes.flat[len(names):]:
        axis.set_visible(False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, name in zip(axes.flat, names):
        groups: dict[str, list[RunRow]] = {}
        for row in finished:
            if name in row.metrics:
                label = row.config + (f" ({row.dataset})" if several_datasets else "")
                groups.setdefault(label, []).append(row)
        for number, (label, group) in enumerate(groups.items()):
            color = colors[number % len(colors)]
            layered = sorted((r for r in group if r.layer_number is not None), key=lambda r: r.layer_number)
            if layered:
                xs = [r.layer_number for r in layered]
                axis.plot(xs, [r.metrics[name] for r in layered], marker="o", color=color, label=label)
                if all(f"{name}_ci_low" in r.metrics for r in layered):
                    axis.fill_between(xs, [r.metrics[f"{name}_ci_low"] for r in layered],
                                      [r.metrics[f"{name}_ci_high"] for r in layered], color=color, alpha=0.15)
            for row in group:
                if row.layer_number is None:
                    axis.axhline(row.metrics[name], linestyle="--", color=color, label=f"{label} (no layers)")
        axis.set_title(name)
        axis.set_xlabel("layer")
        axis.grid(alpha=0.3)
        if groups:
            axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def child_runs(client: MlflowClient, parent_id: str) -> list[Run]:
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=10000)


def pair_scores(client: MlflowClient, run_id: str) -> dict[str, tuple[float, float]]:
    """A run's per-pair (label, score) by pair id, read back from its scores.csv artifact."""
    import csv

    with tempfile.TemporaryDirectory() as folder:
        path = client.download_artifacts(run_id, "scores.csv", folder)
        with open(path, newline="", encoding="utf-8") as handle:
            return {row["id"]: (float(row["label"]), float(row["score"])) for row in csv.DictReader(handle)}


def compare_with_reference(client: MlflowClient, rows: list[RunRow], reference_job: int | None,
                           resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> None:
    """Fill ``versus_reference``: Spearman(config) − Spearman(reference) with a paired bootstrap CI.

    Both are resampled with the same pair indices, so the CI reflects the difference itself, not
    the two scores' separate noise; ``*`` marks a CI that excludes 0. The reference is the job
    numbered ``reference_job`` (default: the sweep's first job), per dataset/split.
    """
    import numpy as np
    from scipy import stats

    finished = [r for r in rows if r.status == "FINISHED"]
    for dataset in {(r.dataset, r.split) for r in finished}:
        group = sorted((r for r in finished if (r.dataset, r.split) == dataset), key=lambda r: (r.job is None, r.job))
        reference = next((r for r in group if r.job == reference_job), group[0]) if reference_job is not None else group[0]
        if reference_job is not None and reference.job != reference_job:
            continue  # the chosen reference is not in this dataset's group
        base = pair_scores(client, reference.run_id)
        ids = sorted(base)
        samples = np.random.default_rng(seed).integers(0, len(ids), size=(resamples, len(ids)))
        labels = np.array([base[i][0] for i in ids])
        base_scores = np.array([base[i][1] for i in ids])
        reference.versus_reference = f"reference (job {reference.job})" if reference.job is not None else "reference"
        for row in group:
            if row is reference:
                continue
            other = pair_scores(client, row.run_id)
            if sorted(other) != ids:
                row.versus_reference = "different pairs"
                continue
            scores = np.array([other[i][1] for i in ids])
            point = stats.spearmanr(scores, labels).statistic - stats.spearmanr(base_scores, labels).statistic
            deltas = np.array([stats.spearmanr(scores[s], labels[s]).statistic - stats.spearmanr(base_scores[s], labels[s]).statistic
                               for s in samples])
            tail = (1 - confidence) / 2 * 100
            low, high = np.nanpercentile(deltas, [tail, 100 - tail])
            mark = " *" if low > 0 or high < 0 else ""
            row.versus_reference = f"{point:+.4f} [{low:+.4f}, {high:+.4f}]{mark}"


def log_sweep_summary(client: MlflowClient, parent_id: str, options=None) -> int:
    """Summary table (CSV + Markdown) and metric-vs-layer plot of a sweep, logged to its parent.

    Returns how many of the sweep's jobs failed.
    """
    rows = run_rows(child_runs(client, parent_id))
    options = options or {}
    compare_with_reference(client, rows, options.get("reference"), int(options.get("resamples", 1000)),
                           seed=int(options.get("seed", 0)))
    header, body = summary_table(rows)
    with tempfile.TemporaryDirectory() as folder:
        write_csv(header, body, Path(folder, "summary.csv"))
        table = markdown(header, body)
        Path(folder, "summary.md").write_text(table, encoding="utf-8")
        plot_metrics_by_layer(rows, Path(folder, "metrics_by_layer.png"))
        client.log_artifacts(parent_id, folder)
    failed = sum(r.status != "FINISHED" for r in rows)
    client.set_tag(parent_id, "jobs", str(len(rows)))
    client.set_tag(parent_id, "failed_jobs", str(failed))
    print(f"\nsweep summary (MLflow parent run {parent_id}):\n{table}", flush=True)
    return failed
