"""``python -m framework``: the Hydra app. One job = one tracked run; a multirun adds a sweep around them."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from framework.errors import LayerprobeError, SweepStopped
from framework.plugins import GROUPS, HARNESS_OPTIONS, KINDS, Registry, registry, unknown_name_message

_SOURCE_CONF = Path(__file__).resolve().parent.parent / "conf"
# A source checkout or editable install reads the top-level conf/; a wheel ships it as framework/conf.
CONF_DIR = _SOURCE_CONF if (_SOURCE_CONF / "config.yaml").is_file() else Path(__file__).resolve().parent / "conf"
CONFIG_GROUPS = (*(GROUPS[kind] for kind in KINDS), "metric")
KIND_OF_GROUP = {group: kind for kind, group in GROUPS.items()}


def register_plugin_configs(plugins: Registry) -> None:
    """Make every registered plugin a Hydra option (``pooler=maxpool``) with its schema's defaults.

    Names with a YAML file in ``conf/`` (the built-ins, whose YAML documents their options) are
    left to that file; third-party plugins need none. Datasets also get the harness-owned options
    ``split`` and ``limit``, post-processors ``train_split`` and ``train_limit``.
    """
    store = ConfigStore.instance()
    for kind in KINDS:
        group = GROUPS[kind]
        for name, component in plugins.components[kind].items():
            if (CONF_DIR / group / f"{name}.yaml").is_file():
                continue
            node = {**HARNESS_OPTIONS.get(kind, {}), **OmegaConf.to_container(OmegaConf.structured(component.schema))}
            if kind == "dataset" and "data_root" in node:
                node["data_root"] = "${data_root}"
            store.store(group=group, name=name, node={"name": name, **node}, provider=component.plugin)


def option_keys(group: str, name: str, plugins: Registry) -> set[str] | None:
    """The keys option ``name`` of config group ``group`` has (its YAML, or a plugin's schema); None if unknown."""
    path = CONF_DIR / group / f"{name}.yaml"
    if path.is_file():
        return set(OmegaConf.load(path).keys()) - {"defaults"}
    kind = KIND_OF_GROUP.get(group)
    component = plugins.components.get(kind, {}).get(name) if kind else None
    if component is None:
        return None
    return {"name", *HARNESS_OPTIONS.get(kind, {}), *OmegaConf.structured(component.schema).keys()}


def widen_option_overrides(arguments: list[str], plugins: Registry) -> list[str]:
    """In a sweep over a group's options (``encoder=glove,rwkv``), an override of a key that only
    some of them have (``encoder.model=…``, a plugin's ``pooler.power=…``) applies to those: it is
    passed to Hydra as ``++key=value`` (add or override) and named in ``only_where_defined``, so
    each job drops it where its option lacks it instead of Hydra failing the whole sweep."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if not any(a in ("-m", "--multirun") for a in arguments):
        return arguments
    parser = OverridesParser.create()
    parsed = {}
    for index, argument in enumerate(arguments):
        if argument.startswith("-") or "=" not in argument:
            continue
        try:
            parsed[index] = parser.parse_overrides([argument])[0]
        except HydraException:
            continue  # check_overrides says what is wrong with it
    swept = {o.key_or_group: list(o.sweep_string_iterator()) for o in parsed.values()
             if o.key_or_group in CONFIG_GROUPS and o.is_sweep_override() and not o.package}
    widened, where = list(arguments), []
    for index, override in parsed.items():
        group, _, key = override.key_or_group.partition(".")
        if not key or group not in swept or override.is_delete():
            continue
        keys = [option_keys(group, choice, plugins) for choice in swept[group]]
        if any(k is None for k in keys):
            continue
        top = key.split(".", 1)[0]
        if not any(top in k for k in keys):
            continue  # none has it: check_overrides says so
        # ``++`` also where every swept option has the key: Hydra first composes the sweep with the
        # group's default option (encoder=glove), which may lack it (-m encoder=rwkv,rwkv7 encoder.model=…)
        widened[index] = "++" + arguments[index].lstrip("+")
        if not all(top in k for k in keys):
            where.append(override.key_or_group)
    if where:
        widened.append(f"only_where_defined=[{','.join(where)}]")
    return widened


def drop_keys_not_defined(cfg: DictConfig, plugins: Registry) -> bool:
    """In a job: remove the ``only_where_defined`` keys its group's option does not have; returns
    whether it removed any (the job may then have the config of another job of the sweep)."""
    from omegaconf import open_dict

    dropped = False
    for name in cfg.get("only_where_defined") or []:
        group, _, key = str(name).partition(".")
        node = cfg.get(group)
        keys = option_keys(group, str(node.get("name")), plugins) if node is not None else None
        top = key.split(".", 1)[0]
        if keys is not None and top not in keys and top in node:
            with open_dict(node):
                node.pop(top)
            dropped = True
    return dropped


def group_options(group: str, plugins: Registry, extra_dirs: list[Path] = ()) -> list[str]:
    names = set(plugins.names(KIND_OF_GROUP[group])) if group in KIND_OF_GROUP else set()
    for folder in (CONF_DIR, *extra_dirs):
        names.update(p.stem for p in (folder / group).glob("*.yaml"))
    return sorted(names)


def _flag_value(arguments: list[str], *flags: str) -> str | None:
    for i, argument in enumerate(arguments):
        for flag in flags:
            if argument == flag and i + 1 < len(arguments):
                return arguments[i + 1]
            if argument.startswith(flag + "="):
                return argument.split("=", 1)[1]
    return None


def check_overrides(arguments: list[str], plugins: Registry) -> None:
    """Fail in one line on bad overrides (also inside sweeps), before Hydra runs anything.

    Malformed overrides, unknown group options (``pooler=nosuch``) and keys the config does not
    have (``pooler.kk=3``) are each one line with exit code 2, instead of Hydra's multi-line report.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(a in ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc") or a.startswith("--info=")
           for a in arguments):
        return
    config_dir = _flag_value(arguments, "--config-dir", "-cd")
    extra_dirs = [Path(config_dir)] if config_dir else []
    skip = {i + 1 for i, a in enumerate(arguments) if a in ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp")}
    candidates = [a for i, a in enumerate(arguments) if i not in skip and not a.startswith("-")]
    parser = OverridesParser.create()
    overrides = []
    for candidate in candidates:
        try:
            overrides += parser.parse_overrides([candidate])
        except HydraException as error:
            first = (str(error).splitlines() or [""])[0]
            raise LayerprobeError(f"malformed override '{candidate}': {first}; write key=value (a sweep: key=a,b)") from None
    for override in overrides:
        group = override.key_or_group
        if group not in CONFIG_GROUPS or override.is_delete() or override.package:
            continue
        choices = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
        known = group_options(group, plugins, extra_dirs)
        for choice in choices:
            if choice not in known:
                raise LayerprobeError(unknown_name_message(group, choice, known))
    multirun = any(a in ("-m", "--multirun") for a in arguments)
    _compose_first_of_each_sweep(overrides, config_dir, _flag_value(arguments, "--config-name", "-cn"), multirun)


def check_writable(folder: Path, mode: str) -> None:
    """Hydra creates its output folder before any job code runs: check it can, in one line."""
    existing = folder.expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        reason = "not a folder" if not existing.is_dir() else "not writable"
        raise LayerprobeError(f"cannot create {folder} (hydra.{'sweep' if mode == 'multirun' else 'run'}.dir, under tracking.dir): "
                              f"{existing} is {reason}; set tracking.dir to a writable folder")


def _compose_first_of_each_sweep(overrides, config_dir: str | None, config_name: str | None, multirun: bool) -> None:
    """Compose the config once (the first value of every sweep) to catch keys that do not exist."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    plain = []
    for override in overrides:
        text = override.input_line
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()), None)
            if first is None:
                continue
            text = f"{override.get_key_element()}={first}"  # the key element keeps its + or ++
        plain.append(text)
    if config_dir:
        plain.append(f"hydra.searchpath=[file://{Path(config_dir).resolve()}]")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name or "config", overrides=plain, return_hydra_config=True)
            output = cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir
            check_writable(Path(str(output)), "multirun" if multirun else "run")
    except (HydraException, OmegaConfBaseException) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        message = " ".join(lines[:2])[:400]
        hint = ""
        if "hydra/launcher" in message:
            hint = " (Hydra launchers are extras: pip install 'layerprobe[joblib]', '[slurm]' or '[ray]')"
        elif "not in struct" in message or "Could not override" in message:
            hint = " (prefix a new key with +, e.g. +key=value; python -m framework --cfg job lists every key)"
        raise LayerprobeError(f"{message}{hint}") from None
    finally:
        GlobalHydra.instance().clear()


def validate_each_swept_value_once() -> None:
    """Hydra's sweeper composes every job's config before launching, and the launcher composes it
    again (0.2–0.3 s each: a 12-job sweep paid ~3 s twice). ``check_overrides`` has already checked
    every swept group option and composed the first job; here the sweeper composes only the jobs
    that bring a value no earlier job had (``layer=1,3,…,11 pooler=mean,attn``: 6 of the other 11),
    so every swept value is still composed before the first job starts."""
    from hydra.plugins.sweeper import Sweeper

    original = Sweeper.validate_batch_is_legal
    if getattr(original, "layerprobe", False):
        return

    def validate_batch_is_legal(self, batch):
        seen = getattr(self, "_layerprobe_values_seen", None)
        if seen is None and batch:  # the first job (every sweep's first value): composed by check_overrides
            seen = {str(o) for o in batch[0]}
        fresh = []
        for overrides in batch:
            values = {str(o) for o in overrides}
            if not values <= seen:
                fresh.append(overrides)
                seen |= values
        self._layerprobe_values_seen = seen
        original(self, fresh)

    validate_batch_is_legal.layerprobe = True
    Sweeper.validate_batch_is_legal = validate_batch_is_legal


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_job(cfg: DictConfig) -> None:
    from framework.job import run_job

    run_job(cfg)


def _interrupt(signum, frame) -> None:
    """SIGTERM (what SLURM and ``kill`` send) stops a sweep the way Ctrl-C does."""
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    from framework.phases import DRIVER

    try:
        with DRIVER.measure("registry"):
            plugins = registry()
            register_plugin_configs(plugins)
        with DRIVER.measure("config_check"):
            arguments = widen_option_overrides(sys.argv[1:], plugins)
            check_overrides(arguments, plugins)
            sys.argv[1:] = arguments
    except LayerprobeError as error:
        print(f"layerprobe: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    validate_each_swept_value_once()
    try:
        hydra_job()
    except SweepStopped:
        from framework.sweep import finish_sweep

        raise SystemExit(finish_sweep("FAILED") or 2)
    except KeyboardInterrupt:
        from framework.sweep import interrupted

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the summary short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        code = interrupted()
        print("layerprobe: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(code or 130)


if __name__ == "__main__":
    main()
