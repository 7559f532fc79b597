"""Tables and plots as pure functions of ``JobResult`` lists: the sweep summary and the report.

Rows are keyed by every setting that differs between the results (shown as columns), so runs that
differ in, say, the tokenizer or the seed are never merged into one row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from framework.results import JobResult, finetune_tag, identity, metric_order, varying_settings

# ms_per_pair: producing the states (what computing them cost, also when read from the cache), pooling, cosine.
# fit_s: what fitting a learned pooler or a post-processor cost on the train split (its states and the fit), "" if none.
COST_COLUMNS = ("n", "states", "ms_per_pair", "fit_s", "peak_memory_mb")


def identity_columns(results: list[JobResult]) -> list[str]:
    """encoder, pooler, dataset, layer, then each other setting that differs between the results."""
    return ["encoder", "pooler", "dataset", "layer", *varying_settings(results)]


def identity_cells(result: JobResult, extra: list[str]) -> list[str]:
    settings = identity(result.settings)
    label = result.label
    return [label["encoder"], label["pooler"], f"{label['dataset']}/{label['split']}", label["layer"],
            *(settings.get(key, "") for key in extra)]


def cost_cells(result: JobResult) -> list[str]:
    per_second = result.metrics.get("pairs_per_second")
    memory = result.metrics.get("peak_gpu_memory_mb", result.metrics.get("peak_rss_mb"))
    fit = fit_cost(result)
    return [str(int(result.metrics["n_pairs"])) if "n_pairs" in result.metrics else "", result.states,
            f"{1000 / per_second:.4f}" if per_second else "", f"{fit:.2f}" if fit is not None else "",
            f"{memory:.0f}" if memory is not None else ""]


def fit_cost(result: JobResult) -> float | None:
    """Seconds the job's fit on the train split cost (encoding it and fitting), or None when nothing was fit."""
    if "fit_seconds" not in result.metrics:
        return None
    return result.metrics["fit_seconds"] + result.metrics.get("fit_encode_seconds", 0.0)


def status_text(result: JobResult) -> str:
    import textwrap

    text = result.status + (" (reused)" if result.origin == "reused" else "")
    return f"{text}: {textwrap.shorten(result.error, 160, placeholder=' …')}" if result.error else text  # cut between words


def summary_table(results: list[JobResult], versus_reference: dict[int, str] | None = None,
                  versus_untuned: dict[int, "Versus"] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the sweep summary: identity columns, metrics with CIs, Δ, cost, status."""
    columns = identity_columns(results)
    extra = columns[4:]
    names = metric_order(results)
    paired = bool(versus_reference)
    tuned = bool(versus_untuned)
    header = [*columns, *names, *(["Δspearman vs reference"] if paired else []), *(["Δspearman vs untuned"] if tuned else []),
              *COST_COLUMNS, "status"]
    body = []
    for index, result in enumerate(results):
        body.append([*identity_cells(result, extra), *(result.metric_text(n) for n in names),
                     *([str(versus_reference.get(index, ""))] if paired else []),
                     *([str(versus_untuned.get(index, ""))] if tuned else []), *cost_cells(result), status_text(result)])
    return header, body


def summary_records(results: list[JobResult], versus_reference: dict[int, Versus] | None = None,
                    versus_untuned: dict[int, Versus] | None = None) -> list[dict[str, Any]]:
    """The summary as numbers, one column per value (``spearman``, ``spearman_ci_low``, …): what
    summary.csv and the parent run's table hold, sortable and plottable. NaN: undefined or none."""
    extra = identity_columns(results)[4:]
    names = metric_order(results)
    records = []
    for index, result in enumerate(results):
        settings = identity(result.settings)
        label = result.label
        record: dict[str, Any] = {"job": result.job, "encoder": label.get("encoder", ""), "pooler": label.get("pooler", ""),
                                  "postprocess": label.get("postprocess", "none"), "finetune": label.get("finetune", "none"),
                                  "dataset": label.get("dataset", ""),
                                  "split": label.get("split", ""), "layer": result.layer_number,
                                  **{key: settings.get(key, "") for key in extra}}
        for name in names:
            for key in (name, f"{name}_ci_low", f"{name}_ci_high"):
                record[key] = float(result.metrics.get(key, float("nan")))
        if versus_reference:
            versus = versus_reference.get(index, Versus(""))
            record.update(delta_spearman=versus.delta, delta_spearman_ci_low=versus.low, delta_spearman_ci_high=versus.high)
        if versus_untuned:
            versus = versus_untuned.get(index, Versus(""))
            record.update(delta_spearman_vs_untuned=versus.delta, delta_spearman_vs_untuned_ci_low=versus.low,
                          delta_spearman_vs_untuned_ci_high=versus.high)
        per_second = result.metrics.get("pairs_per_second")
        memory = result.metrics.get("peak_gpu_memory_mb", result.metrics.get("peak_rss_mb"))
        record.update(n=int(result.metrics["n_pairs"]) if "n_pairs" in result.metrics else None, states=result.states,
                      ms_per_pair=1000 / per_second if per_second else float("nan"),
                      fit_seconds=fit_cost(result) if fit_cost(result) is not None else float("nan"),
                      peak_memory_mb=float(memory) if memory is not None else float("nan"),
                      status=result.status, origin=result.origin, error=result.error)
        records.append(record)
    return records


def write_records_csv(records: list[dict[str, Any]], path: Path) -> None:
    """Numbers at full precision (``repr``), empty for none; the columns are the records' keys, in order."""
    import csv
    import math

    columns = list(dict.fromkeys(key for record in records for key in record))

    def cell(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return repr(value) if isinstance(value, float) else value

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([cell(record.get(key)) for key in columns] for record in records)


@dataclass
class Versus:
    """A config's paired difference to the reference: as Markdown shows it, and as numbers (NaN: none)."""

    text: str
    delta: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")

    def __str__(self) -> str:
        return self.text


def compare_with_reference(results: list[JobResult], reference_job: int | None = None, resamples: int = 1000,
                           confidence: float = 0.95, seed: int = 0) -> dict[int, Versus]:
    """Spearman(config) − Spearman(reference), with a paired bootstrap CI, per dataset/split.

    Both are resampled with the same pair indices, so the CI reflects the difference itself, not
    the two scores' separate noise; ``*`` marks a CI that excludes 0. The reference is the job
    numbered ``reference_job`` (default: the first finished job of each dataset/split). Returns
    the text for each result's position in ``results``.
    """
    texts: dict[int, Versus] = {}
    finished = [(i, r) for i, r in enumerate(results) if r.finished and r.scores is not None]
    for key in sorted({(r.label["dataset"], r.label["split"]) for _, r in finished}):
        group = sorted(((i, r) for i, r in finished if (r.label["dataset"], r.label["split"]) == key),
                       key=lambda item: (item[1].job is None, item[1].job))
        if reference_job is not None:
            chosen = [item for item in group if item[1].job == reference_job]
            if not chosen:
                continue  # the chosen reference is not in this dataset's group
            reference_index, reference = chosen[0]
        else:
            reference_index, reference = group[0]
        texts[reference_index] = Versus(f"reference (job {reference.job})" if reference.job is not None else "reference", 0.0, 0.0, 0.0)
        for index, result in group:
            if index == reference_index:
                continue
            paired = paired_scores(reference.scores, result.scores)
            if paired is None:
                texts[index] = Versus("different pairs")
                continue
            texts[index] = paired_delta(*paired, resamples, confidence, seed)
    return texts


def paired_delta(labels: np.ndarray, base_scores: np.ndarray, scores: np.ndarray, resamples: int, confidence: float,
                 seed: int) -> Versus:
    """Spearman(scores) − Spearman(base_scores) on the same pairs, with a paired bootstrap CI."""
    from scipy import stats

    from framework.bootstrap import rank_correlation, resample_counts

    if np.ptp(scores) == 0 or np.ptp(base_scores) == 0:
        return Versus("undefined: constant scores")  # e.g. [CLS] at the embedding layer
    point = stats.spearmanr(scores, labels).statistic - stats.spearmanr(base_scores, labels).statistic
    of_config, of_reference = rank_correlation(scores, labels), rank_correlation(base_scores, labels)
    deltas = np.concatenate([of_config(c) - of_reference(c) for c in resample_counts(len(labels), resamples, seed)])
    tail = (1 - confidence) / 2 * 100
    low, high = np.nanpercentile(deltas, [tail, 100 - tail])
    mark = " *" if low > 0 or high < 0 else ""
    return Versus(f"{point:+.4f} [{low:+.4f}, {high:+.4f}]{mark}", float(point), float(low), float(high))


def compare_tuned_with_untuned(results: list[JobResult], resamples: int = 1000, confidence: float = 0.95,
                               seed: int = 0) -> dict[int, Versus]:
    """Each fine-tuned config against the same config untuned (same encoder, layer, pooler,
    post-processing, data; ``finetune=none``), when the sweep has it: the paired Δ Spearman with its
    bootstrap CI, by position in ``results``. Empty when nothing was tuned."""
    def untuned_identity(result: JobResult) -> str:
        return json.dumps({k: v for k, v in identity(result.settings).items() if not k.startswith("finetune.")}, sort_keys=True)

    finished = [(i, r) for i, r in enumerate(results) if r.finished and r.scores is not None]
    untuned = {untuned_identity(r): r for _, r in finished if r.label.get("finetune", "none") == "none"}
    texts: dict[int, Versus] = {}
    for index, result in finished:
        if result.label.get("finetune", "none") == "none":
            continue
        base = untuned.get(untuned_identity(result))
        if base is None:
            texts[index] = Versus("no untuned run in this sweep")
            continue
        paired = paired_scores(base.scores, result.scores)
        texts[index] = Versus("different pairs") if paired is None else paired_delta(*paired, resamples, confidence, seed)
    return texts


def paired_scores(reference, other) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Labels, reference scores and other scores of the same pairs, or None if the pairs differ.

    Pairs with unique ids are matched by id (in sorted id order); when ids repeat, the two runs
    must list the same ids in the same order and are paired by position, never by a last-wins
    lookup that would silently drop the repeats.
    """
    if len(set(reference.ids)) == len(reference.ids) and len(set(other.ids)) == len(other.ids):
        if set(reference.ids) != set(other.ids):
            return None
        base, theirs = reference.by_id(), other.by_id()
        ids = sorted(base)
        if any(base[i][0] != theirs[i][0] for i in ids):
            return None
        return (np.array([base[i][0] for i in ids]), np.array([base[i][1] for i in ids]), np.array([theirs[i][1] for i in ids]))
    if list(reference.ids) != list(other.ids) or list(reference.labels) != list(other.labels):
        return None
    return np.asarray(reference.labels, dtype=float), np.asarray(reference.scores, dtype=float), np.asarray(other.scores, dtype=float)


def compact(header: list[str], body: list[list[str]], results: list[JobResult]) -> tuple[list[str], list[list[str]]]:
    """The summary as MLflow's artifact viewer can show it: who, the headline metric, Δ, cost, status.

    Every column stays in summary.csv.
    """
    names = metric_order(results)
    headline = "spearman" if "spearman" in names else (names[0] if names else None)
    keep = [c for c in header if c not in names or c == headline]
    keep = [c for c in keep if c not in ("peak_memory_mb",)]
    index = [header.index(c) for c in keep]
    return keep, [[row[i] for i in index] for row in body]


def _cell(value) -> str:
    """Text as a Markdown table cell: MLflow renders summary.md, so HTML is escaped, not run."""
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(header: list[str], body: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(_cell(c) for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, body)]) + "\n"


def write_csv(header: list[str], body: list[list[str]], path: Path) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(body)


def line_label(result: JobResult, extra: list[str]) -> str:
    """A plot line: encoder/pooler plus every differing setting (not the layer, the x axis)."""
    settings = identity(result.settings)
    post = result.label.get("postprocess", "none")
    parts = [f"{result.label['encoder']}/{result.label['pooler']}" + (f" +{post}" if post != "none" else "") + finetune_tag(result.label)]
    parts += [f"{key}={settings[key]}" for key in extra
              if key not in ("layer", "postprocess.name", "finetune.name") and key in settings]
    return " ".join(parts)  # a setting the result lacks (another encoder's option) is not shown as key=


UNDEFINED = "undefined (NaN, e.g. constant scores)"  # one rendering of an undefined value, in every plot
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")


def line_style(number: int) -> dict:
    """Colour, dash and marker for the n-th line: 10 colours, then new dashes and markers."""
    from matplotlib import colormaps

    colors = colormaps["tab10"].colors
    return {"color": colors[number % 10], "linestyle": LINE_STYLES[(number // 10) % 4], "marker": MARKERS[(number // 40) % 6]}


def plot_metrics_by_layer(results: list[JobResult], path: Path, metrics: list[str] | None = None) -> None:
    """A grid of panels: one row per metric, one column per dataset/split; x = layer.

    One line per config (encoder/pooler and every differing setting) with its CI band. Encoders
    without layers (GloVe, a sentence-transformers model's own embedding) are baselines: a
    horizontal line across the panel with their CI as a band. The legend sits outside the panels.
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    finished = [r for r in results if r.finished]
    present = {name for r in finished for name in r.metrics}
    names = [n for n in (metrics or metric_order(results)) if n in present] or ["spearman"]
    extra = varying_settings(finished)
    datasets = sorted({(r.label["dataset"], r.label["split"]) for r in finished}) or [("", "")]
    configs: dict[str, int] = {}
    for result in finished:
        configs.setdefault(line_label(result, extra), len(configs))
    # One metric over many datasets wraps into rows of three panels (a whole experiment's report
    # stays readable instead of one strip thousands of pixels wide); several metrics: a row each.
    wrap = 3 if len(names) == 1 and len(datasets) > 3 else len(datasets)
    rows_per_metric = -(-len(datasets) // wrap)
    longest = max([len(label) + len(" (no layers)") for label in configs] + [len(UNDEFINED)])
    legend_inches = 0.6 + 0.065 * longest  # the legend sits beside the panels, not over them
    figure = Figure(figsize=(5.2 * wrap + legend_inches, 3.6 * len(names) * rows_per_metric), layout="constrained")
    axes = figure.subplots(len(names) * rows_per_metric, wrap, squeeze=False)
    for axis in axes.flat[len(names) * len(datasets):] if rows_per_metric > 1 else ():
        axis.set_visible(False)  # the last row's empty places
    handles: dict[str, object] = {}
    for row, name in enumerate(names):
        for place, (dataset, split) in enumerate(datasets):
            axis = axes[row * rows_per_metric + place // wrap][place % wrap]
            panel = [r for r in finished if (r.label["dataset"], r.label["split"]) == (dataset, split) and name in r.metrics]
            layered_x = [r.layer_number for r in panel if r.layer_number is not None]
            for label in sorted({line_label(r, extra) for r in panel}, key=configs.get):
                style = line_style(configs[label])
                group = [r for r in panel if line_label(r, extra) == label]
                layered = sorted((r for r in group if r.layer_number is not None), key=lambda r: r.layer_number)
                if layered:
                    xs = [r.layer_number for r in layered]
                    handles[label] = axis.plot(xs, [r.metrics[name] for r in layered], label=label, markersize=4, **style)[0]
                    undefined = [r.layer_number for r in layered if r.metrics[name] != r.metrics[name]]
                    if undefined:  # NaN: drawn as × on the panel's floor, explained once in the legend
                        handles[UNDEFINED] = axis.plot(undefined, [0.02] * len(undefined), linestyle="none", marker="x",
                                                       color=style["color"], markersize=7, clip_on=False,
                                                       transform=axis.get_xaxis_transform())[0]
                    banded = [r for r in layered if f"{name}_ci_low" in r.metrics]  # a point without a CI breaks no band
                    if banded:
                        axis.fill_between([r.layer_number for r in banded], [r.metrics[f"{name}_ci_low"] for r in banded],
                                          [r.metrics[f"{name}_ci_high"] for r in banded], color=style["color"], alpha=0.12)
                for result in (r for r in group if r.layer_number is None):
                    value = result.metrics[name]
                    handles[label + " (no layers)"] = axis.axhline(value, color=style["color"], linestyle="--", linewidth=1.5,
                                                                   label=label + " (no layers)")
                    if f"{name}_ci_low" in result.metrics:
                        axis.axhspan(result.metrics[f"{name}_ci_low"], result.metrics[f"{name}_ci_high"], color=style["color"], alpha=0.08)
            if row == 0:
                axis.set_title(f"{dataset}/{split}" if dataset else "")
            axis.set_ylabel(name)
            if not panel:  # e.g. ROC-AUC on graded labels: said, not drawn as an empty frame
                axis.set_xticks([])
                axis.set_yticks([])
                axis.text(0.5, 0.5, f"{name}: not computed for this data\n(see the runs' notes)", ha="center", va="center",
                          transform=axis.transAxes, color="0.4", fontsize="small")
                continue
            if layered_x:
                axis.set_xlabel("layer")
                axis.set_xticks(sorted(set(layered_x)))
            else:
                axis.set_xticks([])
                axis.set_xlabel("(no layers: baselines only)")
            axis.grid(alpha=0.3)
    if UNDEFINED in handles:
        handles[UNDEFINED] = handles.pop(UNDEFINED)  # last in the legend
    if handles:
        # "outside": constrained layout makes room for the legend, so one draw (no tight-bbox pass) saves it
        figure.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize="small", frameon=False)
    figure.savefig(path, dpi=110)


def write_summary_files(results: list[JobResult], folder: Path, options: dict[str, Any] | None = None) -> dict[str, Path]:
    """summary.csv, summary.md and metrics_by_layer.png of a sweep's results, in ``folder``."""
    options = options or {}
    results = [r for r in results if not is_same_config(r)]  # a baseline swept over layers: one row, one band
    versus = compare_with_reference(results, options.get("reference"), int(options.get("resamples", 1000)),
                                    seed=int(options.get("seed", 0)))
    versus_untuned = compare_tuned_with_untuned(results, int(options.get("resamples", 1000)), seed=int(options.get("seed", 0)))
    header, body = summary_table(results, versus, versus_untuned)
    files = {"summary.csv": folder / "summary.csv", "summary.md": folder / "summary.md",
             "metrics_by_layer.png": folder / "metrics_by_layer.png"}
    write_records_csv(summary_records(results, versus, versus_untuned), files["summary.csv"])
    files["summary.md"].write_text(markdown(*compact(header, body, results)), encoding="utf-8")
    plot_metrics_by_layer(results, files["metrics_by_layer.png"])
    return files


def is_same_config(result: JobResult) -> bool:
    """A job of a sweep that had another job's config (an encoder without layers, swept over layers)."""
    return result.origin.startswith("same config")


def print_summary(results: list[JobResult], files: dict[str, Path], sweep, status: str) -> None:
    table = files["summary.md"].read_text(encoding="utf-8")
    reused = sum(r.origin == "reused" for r in results)
    same = sum(is_same_config(r) for r in results)
    counts = (f"{len(results)} job(s), {sum(r.finished for r in results)} finished" + (f", {reused} reused" if reused else "")
              + (f", {same} with the config of another job (no layers to sweep)" if same else ""))
    print(f"\nsweep summary ({status}; {counts}; sweep {sweep.id} in {sweep.dir}):\n{table}", flush=True)

