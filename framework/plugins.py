"""The plugin manager and the registry of named encoders, poolers, datasets, trackers and metrics."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable

import pluggy
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from framework import hookspecs
from framework.errors import LayerprobeError

PROJECT = "layerprobe"
KINDS = ("encoder", "pooler", "postprocessor", "dataset", "tracker", "finetuner")
# The Hydra config group of each kind (``tracking=mlflow`` picks a tracker).
GROUPS = {"encoder": "encoder", "pooler": "pooler", "postprocessor": "postprocess", "dataset": "dataset", "tracker": "tracking",
          "finetuner": "finetune"}
# Options the harness owns for every plugin of a kind, whether or not its schema declares them.
HARNESS_OPTIONS = {
    "dataset": {"split": "validation", "limit": None},  # passed to load(split, limit)
    "postprocessor": {"train_split": "train", "train_limit": None},  # the pairs fit() sees
    "finetuner": {"train_split": "train", "train_limit": None, "dir": None},  # the pairs tune() sees; where tuned models are kept
}
BUILTIN_MODULES = (
    "plugins.mlflow",
    "plugins.glue",
    "plugins.glove",
    "plugins.rwkv",
    "plugins.hf",
    "plugins.sbert",
    "plugins.pooling",
    "plugins.attention_pooling",
    "plugins.postprocess",
    "plugins.pairs",
    "plugins.metrics",
    "plugins.diagnostics",
    "plugins.finetune",
    "plugins.mteb_tasks",
)


@dataclass(frozen=True)
class Component:
    """A registered encoder, pooler or dataset: how to build it and what options it takes."""

    kind: str
    name: str
    factory: Callable[[Any], Any]
    schema: type
    plugin: str

    def options(self, config: DictConfig | dict) -> Any:
        """Validate ``config`` against the schema; returns a schema instance, or a one-line error."""
        raw = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
        raw.pop("name", None)
        declared = {f.name for f in dataclasses.fields(self.schema)}
        for key in HARNESS_OPTIONS.get(self.kind, {}):  # the harness's, not the schema's
            if key not in declared:
                raw.pop(key, None)
        try:
            merged = OmegaConf.merge(OmegaConf.structured(self.schema), raw)
            return OmegaConf.to_object(merged)
        except OmegaConfBaseException as error:
            message = str(error).splitlines()[0]
            fields = ", ".join(f.name for f in dataclasses.fields(self.schema)) or "none"
            raise LayerprobeError(f"{GROUPS[self.kind]} '{self.name}': {message} (its options: {fields})") from None

    def build(self, config: DictConfig | dict) -> Any:
        return self.factory(self.options(config))


METRIC_INPUTS = ("scores", "vectors")
METRIC_LABELS = ("any", "binary")


@dataclass(frozen=True)
class Metric:
    """A registered metric. ``inputs``: ``scores`` (per-pair scores and labels) or ``vectors`` (the
    evaluated sentences' vectors); ``labels``: ``binary`` if it only means something for 0/1 labels."""

    name: str
    function: Callable[..., float]
    calibrated: bool
    plugin: str
    inputs: str = "scores"
    labels: str = "any"
    # Optional array forms for the bootstrap (framework.bootstrap): ``batched(scores, labels)`` returns
    # ``f(counts) -> values`` for every resample at once; a calibrated metric's ``confusion(tp, fp, fn,
    # tn) -> values`` computes it from confusion counts (arrays), for threshold search and resamples.
    batched: Callable | None = None
    confusion: Callable | None = None


class Registry:
    """Everything the installed plugins registered, by kind and name."""

    def __init__(self, manager: pluggy.PluginManager):
        self.manager = manager
        self.components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        self.metrics: dict[str, Metric] = {}
        for kind in KINDS:
            hook = getattr(manager.hook, f"register_{kind}s")
            for impl in hook.get_hookimpls():
                impl.function(register=functools.partial(self._add_component, kind, impl.plugin_name))
        for impl in manager.hook.register_metrics.get_hookimpls():
            impl.function(register=functools.partial(self._add_metric, impl.plugin_name))

    def _add_component(self, kind: str, plugin: str, name: str, factory: Callable, schema: type) -> None:
        if not dataclasses.is_dataclass(schema):
            raise TypeError(f"plugin {plugin}: the schema of {kind} '{name}' must be a dataclass")
        if "name" in {f.name for f in dataclasses.fields(schema)}:
            raise TypeError(f"plugin {plugin}: the schema of {kind} '{name}' must not have a 'name' field")
        existing = self.components[kind].get(name)
        if existing is not None:
            raise LayerprobeError(f"{kind} '{name}' is registered twice (by {existing.plugin} and {plugin}); uninstall one")
        self.components[kind][name] = Component(kind, name, factory, schema, plugin)

    def _add_metric(self, plugin: str, name: str, function: Callable, calibrated: bool = False,
                    inputs: str = "scores", labels: str = "any", batched: Callable | None = None,
                    confusion: Callable | None = None) -> None:
        if name in self.metrics:
            raise LayerprobeError(f"metric '{name}' is registered twice (by {self.metrics[name].plugin} and {plugin}); uninstall one")
        if inputs not in METRIC_INPUTS or labels not in METRIC_LABELS:
            raise TypeError(f"plugin {plugin}: metric '{name}': inputs must be one of {METRIC_INPUTS}, labels one of {METRIC_LABELS}")
        if calibrated and inputs != "scores":
            raise TypeError(f"plugin {plugin}: metric '{name}': only score metrics can be calibrated")
        if batched is not None and (calibrated or inputs != "scores"):
            raise TypeError(f"plugin {plugin}: metric '{name}': batched= is for uncalibrated score metrics (calibrated ones give confusion=)")
        if confusion is not None and not calibrated:
            raise TypeError(f"plugin {plugin}: metric '{name}': confusion= is for calibrated metrics")
        self.metrics[name] = Metric(name, function, calibrated, plugin, inputs, labels, batched, confusion)

    def names(self, kind: str) -> list[str]:
        return sorted(self.metrics if kind == "metric" else self.components[kind])

    def component(self, kind: str, name: str) -> Component:
        try:
            return self.components[kind][name]
        except KeyError:
            raise LayerprobeError(unknown_name_message(GROUPS.get(kind, kind), name, self.names(kind))) from None

    def metric(self, name: str) -> Metric:
        try:
            return self.metrics[name]
        except KeyError:
            raise LayerprobeError(unknown_name_message("metric", name, self.names("metric"))) from None

    def build(self, kind: str, config: DictConfig) -> Any:
        """Build the component that ``config.name`` names, with ``config``'s other keys as options."""
        name = config.get("name")
        if not name:
            group = GROUPS.get(kind, kind)
            raise LayerprobeError(f"the {group} config has no 'name'; pick one with {group}=<name> ({', '.join(self.names(kind))})")
        return self.component(kind, name).build(config)


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    return (
        f"unknown {kind} '{name}'; available: {', '.join(known) or 'none'} "
        f"(a plugin package adds more through the entry-point group '{PROJECT}')"
    )


@functools.lru_cache(maxsize=1)
def registry() -> Registry:
    """The plugin manager with built-ins and every installed entry point loaded, read once."""
    import importlib

    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    for module_name in BUILTIN_MODULES:
        manager.register(importlib.import_module(module_name), name=module_name)
    manager.load_setuptools_entrypoints(PROJECT)
    return Registry(manager)
