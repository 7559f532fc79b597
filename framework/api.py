"""The Python API: one evaluation from code, with the CLI's defaults, with or without tracking.

    from framework.api import evaluate

    result = evaluate("glove", pooler="mean", dataset="stsb", data_root="../shared/data/glue")
    result.metric("spearman").value

    pairs = [("A man is playing a guitar.", "A man plays the guitar.", 4.8), ...]
    result = evaluate(my_encoder, pooler="cls", pairs=pairs, train_pairs=train, postprocess="whiten")

``encoder``, ``pooler`` and ``dataset`` are each a registered name, a dict of options with a
``name`` (``{"name": "hf", "model": "bert-base-uncased"}``), or an object already built (an encoder
with ``resolve_layer``/``fingerprint``/``encode``, a pooler with ``pool``: see ``framework.stages``).
``pairs`` (and ``train_pairs``) are sentence pairs in memory — ``(a, b, label)`` tuples, dicts with
``sentence1``/``sentence2``/``label``, or a ``PairSet`` — used instead of a dataset. The result is
the ``Evaluation`` the CLI logs; with ``tracking="mlflow"`` (or a dict of its options) it is also
logged as a run.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from omegaconf import DictConfig, OmegaConf

from framework.data import PairSet
from framework.errors import LayerprobeError


class PairsInMemory:
    """A dataset of pairs given in code: splits ``validation`` (and ``train`` if given)."""

    def __init__(self, splits: dict[str, PairSet]):
        self.pairs = splits
        self.splits = tuple(splits)

    def load(self, split: str, limit: int | None) -> PairSet:
        if split not in self.pairs:
            raise LayerprobeError(f"no {split} pairs were given (given: {', '.join(self.splits)}); pass train_pairs= for a train split")
        pairs = self.pairs[split]
        if limit is None or limit >= len(pairs):
            return pairs
        return PairSet(pairs.dataset, split, pairs.ids[:limit], pairs.sentences_a[:limit], pairs.sentences_b[:limit],
                       pairs.labels[:limit], limit, source=pairs.source, label_kind=pairs.label_kind)


def pair_set(pairs: Any, split: str, label_kind: str = "auto") -> PairSet:
    """``(a, b, label)`` tuples, dicts (sentence1, sentence2, label[, id]) or a PairSet → a PairSet."""
    if isinstance(pairs, PairSet):
        return pairs
    ids, a, b, labels = [], [], [], []
    for number, pair in enumerate(pairs):
        if isinstance(pair, dict):
            ids.append(str(pair.get("id", number)))
            a.append(pair["sentence1"])
            b.append(pair["sentence2"])
            labels.append(float(pair["label"]))
        else:
            first, second, label = pair
            ids.append(str(number))
            a.append(first)
            b.append(second)
            labels.append(float(label))
    if not ids:
        raise LayerprobeError(f"no {split} pairs given")
    if label_kind == "auto":
        label_kind = "binary" if set(labels) <= {0.0, 1.0} else "graded"
    return PairSet("pairs", split, ids, a, b, np.asarray(labels, dtype=np.float64), len(ids), source="memory",
                   label_kind=label_kind)


def _choice(group: str, value: Any, overrides: list[str], components: dict[str, Any], kind: str) -> None:
    """A name or an options dict becomes overrides; anything else is an object built by the caller."""
    if isinstance(value, str):
        overrides.append(f"{group}={value}")
    elif isinstance(value, dict):
        options = dict(value)
        name = options.pop("name", None)
        if not name:
            raise LayerprobeError(f"{group}: an options dict needs a 'name' (e.g. {{'name': 'hf', 'model': …}})")
        overrides.append(f"{group}={name}")
        overrides.extend(f"{group}.{key}={_override_value(v)}" for key, v in options.items())
    elif value is not None:
        components[kind] = value


def _override_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        import json

        return json.dumps(value)
    return str(value)


def compose_config(overrides: Iterable[str]) -> DictConfig:
    """The job config the CLI would compose for these overrides (plugins' options included)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from framework.__main__ import CONF_DIR, register_plugin_configs
    from framework.plugins import registry

    register_plugin_configs(registry())
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=list(overrides))
    except Exception as error:  # Hydra's composition errors: one line, as on the command line
        raise LayerprobeError((str(error).splitlines() or [""])[0]) from None
    finally:
        GlobalHydra.instance().clear()


def evaluate(encoder: Any = "glove", pooler: Any = "mean", *, dataset: Any = "mrpc", pairs: Any = None,
             train_pairs: Any = None, label_kind: str = "auto", layer: int | None = None, postprocess: Any = "none",
             metrics: list[str] | None = None, split: str = "validation", limit: int | None = None, seed: int = 0,
             data_root: str | None = None, tracking: Any = None, cache: bool = False, overrides: Iterable[str] = ()):
    """Evaluate ``encoder`` (at ``layer``) pooled by ``pooler`` on ``pairs`` or ``dataset``; returns the Evaluation."""
    from framework.plugins import registry
    from framework.run import evaluate as run_evaluation

    components: dict[str, Any] = {}
    arguments: list[str] = []
    _choice("encoder", encoder, arguments, components, "encoder")
    _choice("pooler", pooler, arguments, components, "pooler")
    _choice("postprocess", postprocess, arguments, components, "postprocessor")
    if pairs is not None:
        splits = {"validation": pair_set(pairs, "validation", label_kind)}
        if train_pairs is not None:
            splits["train"] = pair_set(train_pairs, "train", label_kind)
        components["dataset"] = PairsInMemory(splits)
    else:
        _choice("dataset", dataset, arguments, components, "dataset")
    arguments += [f"layer={_override_value(layer)}", f"seed={seed}", f"dataset.split={split}",
                  f"dataset.limit={_override_value(limit)}", f"cache.enabled={cache}"]
    if data_root is not None:
        arguments.append(f"data_root={data_root}")
    if metrics is not None:
        arguments.append(f"metric.names=[{','.join(metrics)}]")
    if isinstance(tracking, (str, dict)):
        _choice("tracking", tracking, arguments, {}, "tracker")
    cfg = compose_config([*arguments, *overrides])
    if "postprocessor" in components:
        raise LayerprobeError("postprocess: give a registered name or an options dict (objects are not supported yet)")
    if tracking is None:
        return run_evaluation(cfg, registry(), components)
    return _tracked(cfg, components)


def _tracked(cfg: DictConfig, components: dict[str, Any]):
    """Evaluate and log one run with the configured tracker, as a CLI job does."""
    from framework.job import evaluate_tracked, run_name
    from framework.plugins import registry
    from framework.results import config_hash, flatten
    from framework.run import evaluate as run_evaluation
    from framework.sweep import JobInfo

    settings = flatten(OmegaConf.to_container(cfg, resolve=True))
    for kind, value in components.items():  # objects given in code: record what they are, not the unused defaults
        settings = {key: v for key, v in settings.items() if not key.startswith(f"{kind}.") or key == "dataset.split"}
        settings[f"{kind}.name"] = "pairs" if kind == "dataset" else type(value).__name__
    job = JobInfo(run_name(cfg, settings, None), cfg, settings, config_hash(settings))
    tracker = registry().build("tracker", cfg.tracking)
    tracker.start_job(job)
    return evaluate_tracked(tracker, job, lambda: run_evaluation(cfg, registry(), components))


def mteb_model(encoder: Any = "minilm", layer: int | None = None, pooler: Any = "mean", postprocess: Any = "none",
               finetune: Any = "none", *, dataset: Any = "stsb", data_root: str | None = None, seed: int = 0,
               cache: bool = False, overrides: Iterable[str] = ()):
    """One layer as an MTEB model (mteb 2.x ``EncoderProtocol`` with a ``ModelMeta``), for
    ``mteb.evaluate(model, tasks)``. What learns (``finetune``, a learned ``pooler``, ``postprocess``)
    is fit on the train split of ``dataset`` first, as in a job. Needs ``layerprobe[mteb]``."""
    from framework.mteb_model import build_layer_model
    from framework.plugins import registry

    components: dict[str, Any] = {}
    arguments: list[str] = []
    _choice("encoder", encoder, arguments, components, "encoder")
    _choice("pooler", pooler, arguments, components, "pooler")
    _choice("postprocess", postprocess, arguments, components, "postprocessor")
    _choice("finetune", finetune, arguments, components, "finetuner")
    _choice("dataset", dataset, arguments, components, "dataset")
    arguments += [f"layer={_override_value(layer)}", f"seed={seed}", f"cache.enabled={cache}"]
    if data_root is not None:
        arguments.append(f"data_root={data_root}")
    cfg = compose_config([*arguments, *overrides])
    if "postprocessor" in components or "finetuner" in components:
        raise LayerprobeError("postprocess, finetune: give a registered name or an options dict")
    label = encoder if isinstance(encoder, str) else encoder.get("name") if isinstance(encoder, dict) else cfg.encoder.get("name")
    label = str(label or "encoder")  # the name as given (minilm), not the plugin it presets (hf)
    return build_layer_model(cfg, registry(), components, label)
