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
        defaults = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in defaults.items()}  # finetune.lora
        if "data_root" in yaml:
            assert yaml.pop("data_root") == "${data_root}"
            defaults.pop("data_root")
        defaults = {**HARNESS_OPTIONS.get(kind, {}), **defaults}  # the harness's options, in every YAML of the kind
        if kind == "dataset" and path.stem == "mteb":  # MTEB's tasks mostly evaluate their test split
            assert yaml["split"] == "test"
            defaults["split"] = "test"
        if kind == "finetuner":  # where tuned models are kept: beside the MLflow store
            assert yaml.pop("dir") == "${oc.select:tracking.dir,layerprobe-outputs}/finetuned"
            defaults.pop("dir")
        assert yaml == {"name": path.stem, **defaults}, path


def test_a_typo_in_an_option_is_a_one_line_error():
    from framework.errors import LayerprobeError

    with pytest.raises(LayerprobeError) as error:
        registry().build("encoder", OmegaConf.create({"name": "glove", "lowercas": False}))
    assert "lowercas" in str(error.value) and "its options: vectors" in str(error.value)


def test_the_sweeper_composes_each_swept_value_once_before_launching():
    """Hydra's sweeper composed every job before launch and the launcher again; layerprobe's check
    composed the first job. The sweeper now composes only jobs that bring a new value: every value
    is still composed before any job runs, and a bad later value still stops the sweep there."""
    from itertools import product
    from types import SimpleNamespace

    from hydra.plugins.sweeper import Sweeper

    from framework.__main__ import validate_each_swept_value_once

    original = Sweeper.validate_batch_is_legal
    composed = []

    class Loader:
        def load_sweep_config(self, master_config, sweep_overrides):
            composed.append(tuple(sweep_overrides))
            if "pooler=broken" in sweep_overrides:
                raise ValueError("cannot compose pooler=broken")

    try:
        validate_each_swept_value_once()
        validate_each_swept_value_once()  # idempotent: one wrapper, not two
        sweeper = SimpleNamespace(hydra_context=SimpleNamespace(config_loader=Loader()), config=object())
        batch = [[f"layer={layer}", f"pooler={pooler}", "data_root=x"] for layer, pooler in product((1, 3, 5, 7, 9, 11), ("mean", "attn"))]
        Sweeper.validate_batch_is_legal(sweeper, batch)
        assert len(composed) == 6 and tuple(batch[0]) not in composed  # job 0 was composed by check_overrides
        assert {value for job in composed for value in job} | set(batch[0]) == {value for job in batch for value in job}
        composed.clear()
        Sweeper.validate_batch_is_legal(sweeper, [["layer=1", "pooler=mean", "data_root=x"]])  # a later batch: nothing new
        assert composed == []
        with pytest.raises(ValueError, match="pooler=broken"):
            Sweeper.validate_batch_is_legal(sweeper, [["layer=1", "pooler=broken", "data_root=x"]])
    finally:
        Sweeper.validate_batch_is_legal = original


def test_finetune_none_keeps_the_config_hash_runs_had_before_fine_tuning_existed():
    from framework.results import config_hash

    before = {"encoder.name": "glove", "pooler.name": "mean", "dataset.name": "mrpc", "layer": None, "seed": 0}
    now = {**before, "finetune.name": "none", "finetune.train_split": "train", "finetune.train_limit": None}
    assert config_hash(now) == config_hash(before)  # resume=true still finds the older runs
    assert config_hash({**now, "finetune.name": "contrastive"}) != config_hash(before)
    assert config_hash({**now, "finetune.name": "contrastive", "finetune.lr": 1e-5}) != \
        config_hash({**now, "finetune.name": "contrastive", "finetune.lr": 2e-5})
