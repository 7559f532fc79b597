"""``python -m framework``: the Hydra app. One job = one MLflow run; a multirun adds a parent run."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from framework.errors import LayerprobeError
from framework.plugins import KINDS, Registry, registry

_SOURCE_CONF = Path(__file__).resolve().parent.parent / "conf"
# A source checkout or editable install reads the top-level conf/; a wheel ships it as framework/conf.
CONF_DIR = _SOURCE_CONF if (_SOURCE_CONF / "config.yaml").is_file() else Path(__file__).resolve().parent / "conf"
CONFIG_GROUPS = (*KINDS, "metric")


def register_plugin_configs(plugins: Registry) -> None:
    """Make every registered plugin a Hydra option (``pooler=maxpool``) with its schema's defaults.

    Names with a YAML file in ``conf/`` (the built-ins, whose YAML documents their options) are
    left to that file; third-party plugins need none.
    """
    store = ConfigStore.instance()
    for kind in KINDS:
        for name, component in plugins.components[kind].items():
            if (CONF_DIR / kind / f"{name}.yaml").is_file():
                continue
            node = OmegaConf.to_container(OmegaConf.structured(component.schema))
            if kind == "dataset" and "data_root" in node:
                node["data_root"] = "${data_root}"
            store.store(group=kind, name=name, node={"name": name, **node}, provider=component.plugin)


def group_options(group: str, plugins: Registry, extra_dirs: list[Path] = ()) -> list[str]:
    names = set(plugins.names(group)) if group in KINDS else set()
    for folder in (CONF_DIR, *extra_dirs):
        names.update(p.stem for p in (folder / group).glob("*.yaml"))
    return sorted(names)


def check_group_choices(arguments: list[str], plugins: Registry) -> None:
    """Fail in one line on ``pooler=nosuch`` (also inside sweeps) before Hydra composes anything."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    extra_dirs = [Path(arguments[i + 1]) for i, a in enumerate(arguments[:-1]) if a in ("--config-dir", "-cd")]
    candidates = [a for a in arguments if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except HydraException:
        return  # Hydra reports malformed overrides itself
    for override in overrides:
        group = override.key_or_group
        if group not in CONFIG_GROUPS or override.is_delete() or override.package:
            continue
        if override.is_sweep_override():
            choices = list(override.sweep_string_iterator())
        else:
            choices = [override.get_value_element_as_str()]
        known = group_options(group, plugins, extra_dirs)
        for choice in choices:
            if choice not in known:
                from framework.plugins import unknown_name_message

                raise LayerprobeError(unknown_name_message(group, choice, known))


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_job(cfg: DictConfig) -> None:
    run_job(cfg)


def run_job(cfg: DictConfig) -> None:
    """Evaluate, track, print the result line. In a multirun a failed job does not stop the sweep."""
    from framework.run import evaluate, result_line
    from framework.tracking import job_run, log_evaluation

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    name = f"{cfg.encoder.name} {cfg.pooler.name} {cfg.dataset.name} layer={cfg.get('layer')}"
    try:
        with job_run(cfg, name):
            if multirun:
                import mlflow

                mlflow.set_tag("layerprobe.job", str(HydraConfig.get().job.num))
            evaluation = evaluate(cfg, registry())
            log_evaluation(cfg, evaluation)
        print(result_line(cfg, evaluation), flush=True)
    except LayerprobeError as error:
        print(f"layerprobe: error: {error}", file=sys.stderr, flush=True)
        if not multirun:
            raise SystemExit(2)
    except Exception as error:
        if not multirun:
            raise
        traceback.print_exc()
        print(f"layerprobe: job failed ({name}): {type(error).__name__}: {error}", file=sys.stderr, flush=True)


def main() -> None:
    try:
        plugins = registry()
        register_plugin_configs(plugins)
        check_group_choices(sys.argv[1:], plugins)
    except LayerprobeError as error:
        print(f"layerprobe: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    hydra_job()


if __name__ == "__main__":
    main()
