"""``python -m framework.report``: the layer-wise table and plot, rebuilt from a tracker's records.

Rows are encoder/pooler/dataset (and metric, when several are asked for) plus every other setting that differs between the runs (so runs
that differ in tokenizer, limit or seed are never merged); columns are layers, cells the metric
with its 95% CI, then time per pair and peak memory. Of several runs with the same config, the
newest finished one is shown and the ``runs`` column says how many there were.

    python -m framework.report [--experiment layerprobe] [--parent RUN_ID] [--metric spearman[,anisotropy,…]] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from framework.errors import LayerprobeError
from framework.results import JobResult, identity, newest_per_config, varying_settings


def layer_table(results: list[JobResult], metrics: list[str], shared: dict[str, int] | None = None) -> tuple[list[str], list[list[str]]]:
    """Rows (encoder, pooler, dataset, differing settings, metric) × columns layers, then cost and run counts."""
    shared = shared or {}
    finished = [r for r in results if r.finished and any(m in r.metrics for m in metrics)]
    extra = [key for key in varying_settings(finished) if key != "layer"]
    layers = sorted({r.label["layer"] for r in finished}, key=lambda l: (l != "-", int(l) if l.lstrip("-").isdigit() else 0))
    groups: dict[tuple, dict[str, JobResult]] = {}
    for result in finished:
        settings = identity(result.settings)
        key = (result.label["encoder"], result.label["pooler"], f"{result.label['dataset']}/{result.label['split']}",
               *(settings.get(k, "") for k in extra))
        groups.setdefault(key, {})[result.label["layer"]] = result
    several = len(metrics) > 1
    header = ["encoder", "pooler", "dataset", *extra, *(["metric"] if several else []), *(f"layer {l}" for l in layers),
              "ms_per_pair", "peak_memory_mb", "runs"]
    body = []
    for key, by_layer in sorted(groups.items()):
        runs = list(by_layer.values())
        per_pair = [1000 / r.metrics["pairs_per_second"] for r in runs if r.metrics.get("pairs_per_second")]
        memory = [m for r in runs if (m := r.metrics.get("peak_gpu_memory_mb", r.metrics.get("peak_rss_mb"))) is not None]
        repeats = [shared.get(r.config_hash, 1) for r in runs]
        cost = [f"{sum(per_pair) / len(per_pair):.4f}" if per_pair else "", f"{max(memory):.0f}" if memory else "",
                str(len(runs)) + (f" (+{sum(repeats) - len(repeats)} older with the same config)" if sum(repeats) > len(repeats) else "")]
        for metric in metrics:
            if not any(metric in r.metrics for r in runs):
                continue
            body.append([*key, *([metric] if several else []),
                         *(by_layer[l].metric_text(metric) if l in by_layer else "" for l in layers), *cost])
    return header, body


def report_records(results: list[JobResult], metrics: list[str], shared: dict[str, int]) -> list[dict]:
    """report.csv: one row per run and metric, the value and its CI as numbers (tidy: sort, filter, plot)."""
    from framework.summary import summary_records

    extra = [key for key in varying_settings(results) if key != "layer"]
    records = []
    for result, record in zip(results, summary_records(results)):
        for metric in metrics:
            if metric not in result.metrics:
                continue
            records.append({**{k: record[k] for k in ("encoder", "pooler", "postprocess", "dataset", "split", "layer", *extra)
                               if k in record},
                            "metric": metric, **{column: float(result.metrics.get(key, float("nan"))) for column, key in
                                                 (("value", metric), ("ci_low", f"{metric}_ci_low"), ("ci_high", f"{metric}_ci_high"))},
                            "ms_per_pair": record["ms_per_pair"],
                            "peak_memory_mb": record["peak_memory_mb"], "runs_with_this_config": shared.get(result.config_hash, 1),
                            "run": result.run_ref})
    return records


def build_report(tracker, parent: str | None, metric: str | list[str], out: Path, description: str = "the store") -> str:
    """The report of ``tracker``'s runs (or of the sweep ``parent``): Markdown, CSV and PNG in ``out``.

    ``metric``: one name or several (a comma-separated string or a list): rows per metric, one
    plot panel each.
    """
    from framework.stages import ReportSource
    from framework.summary import markdown, plot_metrics_by_layer, write_records_csv

    metrics = [m.strip() for m in metric.split(",")] if isinstance(metric, str) else list(metric)
    if not isinstance(tracker, ReportSource):
        raise LayerprobeError("this tracker cannot read its runs back for a report; use tracking=mlflow")
    results = tracker.load_results(parent)
    newest, shared = newest_per_config(results)
    missing = [m for m in metrics if not any(r.finished and m in r.metrics for r in newest)]
    if missing:
        raise LayerprobeError(f"{description}{f' (parent {parent})' if parent else ''} has no finished run with "
                              f"{', '.join(map(repr, missing))}")
    header, body = layer_table(newest, metrics, shared)
    table = markdown(header, body)
    records = report_records([r for r in newest if r.finished], metrics, shared)
    tuned_table = versus_untuned_table(tracker, newest, records)
    if tuned_table:
        table += "\nΔspearman of each fine-tuned config against the same config untuned (paired bootstrap, 95% CI):\n\n" + tuned_table
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(table, encoding="utf-8")
    write_records_csv(records, out / "report.csv")
    plot_metrics_by_layer([r for r in newest if r.finished], out / "report.png", metrics)
    duplicates = sum(count - 1 for count in shared.values())
    if duplicates:
        table += f"\n{duplicates} older run(s) repeat a config shown here; each row shows the newest.\n"
    return table


def versus_untuned_table(tracker, results: list[JobResult], records: list[dict]) -> str:
    """Markdown rows × layers of Δ Spearman, tuned against untuned, when the runs include both
    (their per-pair scores read back from the tracker); the same numbers go into ``records``
    (``delta_spearman_vs_untuned`` and its CI on the spearman rows). Empty when nothing was tuned."""
    from framework.stages import ScoreSource
    from framework.summary import compare_tuned_with_untuned, markdown

    finished = [r for r in results if r.finished]
    if not isinstance(tracker, ScoreSource) or all(r.label.get("finetune", "none") == "none" for r in finished):
        return ""
    for result in finished:
        if result.scores is None:
            result.scores = tracker.scores_of(result)
    versus = compare_tuned_with_untuned(finished)
    if not versus:
        return ""
    layers = sorted({finished[i].label["layer"] for i in versus}, key=lambda l: (l != "-", int(l) if l.lstrip("-").isdigit() else 0))
    rows: dict[tuple, dict[str, str]] = {}
    for index, delta in versus.items():
        result = finished[index]
        label = result.label
        key = (label["encoder"], label["pooler"], label.get("postprocess", "none"), f"{label['dataset']}/{label['split']}",
               label["finetune"])
        rows.setdefault(key, {})[label["layer"]] = str(delta)
        for record in records:
            if record.get("run") == result.run_ref and record.get("metric") == "spearman":
                record.update(delta_spearman_vs_untuned=delta.delta, delta_spearman_vs_untuned_ci_low=delta.low,
                              delta_spearman_vs_untuned_ci_high=delta.high)
    header = ["encoder", "pooler", "postprocess", "dataset", "finetune", *(f"layer {l}" for l in layers)]
    return markdown(header, [[*key, *(cells.get(l, "") for l in layers)] for key, cells in sorted(rows.items())])


MTEB_TASKS = {"stsb": "STSBenchmark"}  # our dataset name → MTEB's task name, where MTEB has the task


def mteb_results(results: list[JobResult], out: Path) -> tuple[list[Path], int]:
    """MTEB's own results layout, written by mteb's own ``TaskResult`` and ``ResultCache``:
    ``<out>/results/<model>/<revision>/experiments/<layer, pooler…>/<Task>.json`` + ``model_meta.json``,
    which ``mteb.ResultCache(out).load_results()`` reads back. Returns (files written, runs left out).

    One model per encoder (``layerprobe/<encoder>__L<layer>__<pooler>[__<postprocess>]``, the
    revision its config hash) and one task file per (run, task). Runs of ``dataset=mteb`` carry the
    task's own scores (``mteb.*``); STS-B runs map to ``STSBenchmark`` (cosine Spearman/Pearson as
    layerprobe logged them, ``main_score`` cosine Spearman as in MTEB's STS tasks). Each score entry
    also carries its bootstrap CI (``confidence_intervals_95``) and where it came from
    (``layerprobe``: run, config hash, the pairs' revision, resamples). Runs on data MTEB has no
    task for (MRPC, QQP, your own pairs) are left out and counted.
    """
    try:
        import mteb
        from mteb.results import TaskResult
    except ImportError:
        raise LayerprobeError("--format mteb writes MTEB's results with the mteb package: pip install 'layerprobe[mteb]'") from None
    from framework.mteb_model import layer_model_name, model_meta

    cache = mteb.ResultCache(out)
    written, left_out = [], 0
    for result in results:
        if not result.finished:
            continue
        label, metrics = result.label, result.metrics
        dataset = str(label["dataset"])
        task_name = dataset.split(":", 1)[1].split("/", 1)[0] if dataset.startswith("mteb:") else MTEB_TASKS.get(dataset)
        if task_name is None:
            left_out += 1
            continue
        task = mteb.get_task(task_name)
        if dataset.startswith("mteb:"):
            scores = {k.removeprefix("mteb."): v for k, v in metrics.items() if k.startswith("mteb.")}
        else:
            scores = {"cosine_spearman": metrics.get("spearman"), "cosine_pearson": metrics.get("pearson"),
                      "spearman": metrics.get("spearman"), "pearson": metrics.get("pearson")}
            scores["main_score"] = scores["cosine_spearman"]
        scores = {key: (None if value != value else value) for key, value in scores.items() if value is not None}  # NaN → null
        if "main_score" not in scores:
            left_out += 1
            continue
        # A score gets layerprobe's bootstrap CI only where it is layerprobe's number: the same metric
        # of the same cosines (MTEB's main score may be another similarity's, e.g. max_ap).
        ours = {"cosine_spearman": "spearman", "cosine_pearson": "pearson", "spearman": "spearman", "pearson": "pearson",
                "main_score": "spearman" if task.metadata.type == "STS" else "average_precision", "cosine_ap": "average_precision"}
        scores["confidence_intervals_95"] = {
            key: [metrics[f"{ours[key]}_ci_low"], metrics[f"{ours[key]}_ci_high"]] for key, value in scores.items()
            if key in ours and f"{ours[key]}_ci_low" in metrics and value is not None and abs(value - metrics[ours[key]]) <= 1e-9}
        scores["layerprobe"] = {"run": result.run_ref, "config_hash": result.config_hash, "pairs_revision": result.data_revision or None,
                                "n_pairs": metrics.get("n_pairs"),
                                "bootstrap_resamples": _number_or_none(result.settings.get("metric.bootstrap_resamples")),
                                **({"dataset_hub_revision": result.settings["dataset.revision"]}
                                   if result.settings.get("dataset.revision") not in (None, "", "null", "None") else {})}
        seconds = (metrics.get("n_pairs", 0) / metrics["pairs_per_second"]) if metrics.get("pairs_per_second") else None
        subset = dataset.split("/", 1)[1] if dataset.startswith("mteb:") and "/" in dataset else "default"
        task_result = TaskResult.from_task_results(task, {label["split"]: {subset: scores}}, evaluation_time=seconds)
        postprocess, tuned = label.get("postprocess", "none"), label.get("finetune", "none")
        finetune = f"ft-{tuned.split(':', 1)[-1]}" if tuned != "none" else None
        name = layer_model_name(label["encoder"], label["layer"], label["pooler"], postprocess, finetune)
        experiment = {"layer": label["layer"], "pooler": label["pooler"], **({"postprocess": postprocess} if postprocess != "none" else {}),
                      **({"finetune": finetune} if finetune else {})}
        meta = model_meta(name, str(result.config_hash)[:12], None, experiment)
        cache.save_to_cache(task_result, meta)
        written.append(cache.get_task_result_path(model_name=meta, model_revision=meta.revision, task_name=task_name))
    return written, left_out


def _number_or_none(text: str | None) -> int | None:
    return int(text) if text is not None and str(text).isdigit() else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m framework.report", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="layerprobe")
    parser.add_argument("--parent", help="only the jobs of this sweep (its parent run id)")
    parser.add_argument("--metric", default="spearman", help="a metric, or several: spearman,anisotropy,effective_rank")
    parser.add_argument("--tracker", default="mlflow", help="the tracker whose records are read (tracking=… of the runs)")
    parser.add_argument("--tracking-uri", help="e.g. http://127.0.0.1:5000; default: sqlite:///<tracking-dir>/mlflow.db")
    parser.add_argument("--tracking-dir", default="mlruns")
    parser.add_argument("--out", type=Path, default=Path("mlruns") / "report")
    parser.add_argument("--format", choices=["table", "mteb"], default="table",
                        help="table: report.md/.csv/.png; mteb: MTEB's results layout under --out (needs layerprobe[mteb])")
    args = parser.parse_args(argv)
    from framework.plugins import registry

    options = {"name": args.tracker, "uri": args.tracking_uri, "dir": args.tracking_dir, "experiment": args.experiment}
    try:
        tracker = registry().build("tracker", {key: value for key, value in options.items() if value is not None})
        if args.format == "mteb":
            from framework.stages import ReportSource

            if not isinstance(tracker, ReportSource):
                raise LayerprobeError("this tracker cannot read its runs back; use --tracker mlflow")
            newest, _ = newest_per_config(tracker.load_results(args.parent))
            written, left_out = mteb_results(newest, args.out)
            print(f"{len(written)} MTEB result file(s) under {args.out} (mteb.ResultCache('{args.out}') loads them)"
                  + (f"; {left_out} run(s) on data MTEB has no task for left out" if left_out else ""))
            return
        print(build_report(tracker, args.parent, args.metric, args.out, f"experiment '{args.experiment}'"), end="")
    except LayerprobeError as error:
        print(f"layerprobe: error: {error}", file=sys.stderr)
        raise SystemExit(2)
    print(f"\n(also {args.out / 'report.csv'} and {args.out / 'report.png'})")


if __name__ == "__main__":
    main()
