"""Every option of every config group composes and builds; built-in YAML matches its schema."""

import dataclasses

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from framework.__main__ import CONF_DIR, CONFIG_GROUPS, group_options, register_plugin_configs
from framework.metricset import MetricSet
from framework.plugins import GROUPS, HARNESS_OPTIONS, KINDS, registry


def all_choices():
    plugins = registry()
    return [(group, option) for group in CONFIG_GROUPS for option in group_options(group, plugins)]


# Options that cannot be built without the user's input: what the test gives them.
REQUIRED = {("dataset", "pairs"): ["dataset.hub=someone/some-pairs"]}


@pytest.mark.parametrize("group, option", all_choices())
def test_every_option_composes_and_builds(group, option):
    register_plugin_configs(registry())
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"{group}={option}", *REQUIRED.get((group, option), [])])
    if group == "metric":
        assert MetricSet.from_config(cfg.metric, registry()).metrics
    else:
        kind = {g: k for k, g in GROUPS.items()}[group]
        built = registry().build(kind, cfg[group])
        assert built is not None and cfg[group].name in registry().names(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_builtin_yaml_lists_exactly_its_schema_defaults(kind):
    plugins = registry()
    for path in sorted((CONF_DIR / GROUPS[kind]).glob("*.yaml")):
        yaml = OmegaConf.to_container(OmegaConf.load(path))
        if "defaults" in yaml:  # a preset of another option (encoder=minilm is hf with a model): checked by composing
            continue
        component = plugins.component(kind, path.stem)
        defaults = {f.name: getattr(component.schema(), f.name) for f in dataclasses.fields(component.schema)}
        if "data_root" in yaml:
            assert yaml.pop("data_root") == "${data_root}"
            defaults.pop("data_root")
        defaults = {**HARNESS_OPTIONS.get(kind, {}), **defaults}  # the harness's options, in every YAML of the kind
        assert yaml == {"name": path.stem, **defaults}, path


def test_a_typo_in_an_option_is_a_one_line_error():
    from framework.errors import LayerprobeError

    with pytest.raises(LayerprobeError) as error:
        registry().build("encoder", OmegaConf.create({"name": "glove", "lowercas": False}))
    assert "lowercas" in str(error.value) and "its options: vectors" in str(error.value)
