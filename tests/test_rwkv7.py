"""RWKV-7 (x070): parity with BlinkDL's official runtime (plain and DeepEmbed), every layout,
layers, packing, the encoder's options, and RWKV-6 beside RWKV-7 in one sweep."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework.errors import LayerprobeError
from plugins.rwkv.checkpoint import blinkdl7_to_fla, build_model, load_checkpoint
from plugins.rwkv.encoder import RWKVEncoder, RWKVOptions
from plugins.rwkv.random_checkpoint import random_state, random_state7, write_fla7_folder

LAYERS, HIDDEN = 3, 128
TOKENS = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(7))
OFFICIAL = """
import os, sys, torch
os.environ.update(RWKV_V7_ON="1", RWKV_JIT_ON="0", RWKV_CUDA_ON="0")
if sys.argv[3] == "deep": os.environ["RWKV_DE_VERSION"] = "1"
from rwkv.model import RWKV
model = RWKV(model=sys.argv[1].removesuffix(".pth"), strategy="cpu fp32")
logits, _ = model.forward([int(t) for t in sys.argv[4].split(",")], None, full_output=True)
torch.save(logits, sys.argv[2])
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rwkv7")
    paths = {}
    for name, deep in (("plain", False), ("deep", True)):
        paths[name] = folder / f"{name}.pth"
        torch.save(random_state7(LAYERS, HIDDEN, None, 512, seed=2, deep_embed=deep), paths[name])
    return paths


def official_logits(path: Path, variant: str, tmp_path: Path) -> torch.Tensor:
    """The official runtime in its own process: it picks x070 (and DeepEmbed) when it is imported."""
    pytest.importorskip("rwkv", reason="BlinkDL's rwkv package (the parity reference) is not installed")
    out = tmp_path / f"{variant}.logits"
    done = subprocess.run([sys.executable, "-c", OFFICIAL, str(path), str(out), variant, ",".join(map(str, TOKENS.tolist()))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("variant", ["plain", "deep"])
def test_every_tokens_logits_match_the_official_runtime(checkpoints, tmp_path, variant):
    reference = official_logits(checkpoints[variant], variant, tmp_path)
    model = build_model(load_checkpoint(str(checkpoints[variant])))
    assert model.config.version == 7 and model.config.deep_embed == (variant == "deep")
    logits = model.logits(TOKENS, torch.tensor([0, len(TOKENS)]))
    assert logits.shape == reference.shape
    assert float(((logits - reference).abs().amax(dim=1) / reference.abs().amax(dim=1)).max()) <= 1e-4


def test_a_cut_checkpoint_gives_that_blocks_output(checkpoints, tmp_path):
    """The official runtime cut after block 1 gives head(ln_out(x)); so must hidden_states[1]."""
    state = {k: v for k, v in torch.load(checkpoints["plain"], weights_only=True).items()
             if not k.startswith("blocks.") or int(k.split(".")[1]) <= 1}
    torch.save(state, tmp_path / "cut.pth")
    reference = official_logits(tmp_path / "cut.pth", "plain", tmp_path)
    model = build_model(load_checkpoint(str(checkpoints["plain"])))
    hidden = model.hidden_state(TOKENS, torch.tensor([0, len(TOKENS)]), 1)
    logits = model.head(torch.nn.functional.layer_norm(hidden, (HIDDEN,), model.ln_out.weight, model.ln_out.bias))
    assert float((logits - reference).abs().max() / reference.abs().max()) <= 1e-4


def test_safetensors_and_the_fla_hub_layout_give_identical_states(checkpoints, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(checkpoints["plain"], weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "plain.safetensors"))
    folder = write_fla7_folder(state, tmp_path / "fla")
    models = [build_model(load_checkpoint(str(p))) for p in (checkpoints["plain"], tmp_path / "plain.safetensors", folder)]
    cu = torch.tensor([0, 10, len(TOKENS)])
    for index in range(LAYERS + 1):
        first = models[0].hidden_state(TOKENS, cu, index)
        assert all(torch.equal(first, m.hidden_state(TOKENS, cu, index)) for m in models[1:]), index


def test_the_fla_hub_names_are_those_of_flash_linear_attentions_own_model(checkpoints):
    """Every tensor of our fla-hub layout loads into fla's RWKV7ForCausalLM, strictly (names and shapes)."""
    try:
        from fla.models import RWKV7Config, RWKV7ForCausalLM
    except Exception as error:  # not installed, or it cannot import on this machine
        pytest.skip(f"flash-linear-attention is not importable here ({type(error).__name__}); pip install 'layerprobe[rwkv-train]'")
    state = torch.load(checkpoints["plain"], weights_only=True)
    config = RWKV7Config(hidden_size=HIDDEN, head_dim=64, num_hidden_layers=LAYERS, intermediate_size=4 * HIDDEN, vocab_size=512,
                         decay_low_rank_dim=32, a_low_rank_dim=32, v_low_rank_dim=32, gate_low_rank_dim=32, fuse_norm=False)
    RWKV7ForCausalLM(config).load_state_dict(blinkdl7_to_fla(state), strict=True)


def test_sentences_in_one_pack_do_not_see_each_other(checkpoints):
    model = build_model(load_checkpoint(str(checkpoints["deep"])))
    a, b = TOKENS[:9], TOKENS[9:]
    together = model.hidden_state(TOKENS, torch.tensor([0, 9, len(TOKENS)]), 2)
    alone = torch.cat([model.hidden_state(a, torch.tensor([0, 9]), 2), model.hidden_state(b, torch.tensor([0, len(b)]), 2)])
    assert float((together - alone).abs().max()) <= 1e-5


def test_the_encoder_checks_the_version_and_never_resumes_from_a_shallower_layer(checkpoints, tmp_path):
    six = tmp_path / "six.pth"
    torch.save(random_state(2, HIDDEN, 448, 512), six)
    with pytest.raises(LayerprobeError, match="encoder.version=7 but .* is an RWKV-6 checkpoint"):
        RWKVEncoder(RWKVOptions(model=str(six), version=7, device="cpu")).fingerprint()
    with pytest.raises(LayerprobeError, match="encoder.version=5: use 6"):
        RWKVEncoder(RWKVOptions(model=str(six), version=5, device="cpu"))
    seven = RWKVEncoder(RWKVOptions(model=str(checkpoints["plain"]), version=7, device="cpu"))
    assert seven.resolve_layer(-1).index == LAYERS and not seven.can_resume_from(seven.resolve_layer(0))
    assert "RWKV-7" in str(pytest.raises(LayerprobeError, seven.resolve_layer, 9).value)
    assert seven.fingerprint() != RWKVEncoder(RWKVOptions(model=str(six), device="cpu")).fingerprint()


def test_rwkv6_beside_rwkv7_in_one_sweep_and_one_figure(run_cli, tmp_path):
    """Two encoder options of the rwkv group (RWKV-6 and RWKV-7 checkpoints) in one sweep over layers."""
    pytest.importorskip("pyrwkv_tokenizer", reason="the RWKV world tokenizer is not installed")
    from test_graded_and_postprocess import write_stsb

    conf = tmp_path / "conf" / "encoder"
    conf.mkdir(parents=True)
    torch.save(random_state(2, 64, 224, 65536, seed=1), tmp_path / "six.pth")
    torch.save(random_state7(2, 64, None, 65536, seed=1), tmp_path / "seven.pth")
    for name, version in (("six", 6), ("seven", 7)):
        (conf / f"{name}.yaml").write_text(f"name: rwkv\nmodel: {tmp_path / (name + '.pth')}\nversion: {version}\n"
                                           "device: cpu\nprogress: false\n")
    folder = write_stsb(tmp_path / "STS-B")
    result = run_cli("-m", f"--config-dir={tmp_path / 'conf'}", "encoder=six,seven", "layer=0,2", "pooler=mean,last",
                     "dataset=stsb", f"dataset.data_dir={folder}", "metric=spearman", "metric.bootstrap_resamples=50")
    assert result.returncode == 0, result.stderr[-3000:]
    (parent,) = result.parents()
    artifacts = Path(parent.info.artifact_uri.removeprefix("file://"))
    rows = list(csv.DictReader((artifacts / "summary.csv").read_text().splitlines()))
    assert sorted({(row["encoder.version"], row["layer"]) for row in rows}) == [("6", "0"), ("6", "2"), ("7", "0"), ("7", "2")]
    assert len(rows) == 8 and all(row["status"] == "FINISHED" for row in rows)
    assert (artifacts / "metrics_by_layer.png").stat().st_size > 10_000


def test_a_key_every_swept_option_has_overrides_them_all(run_cli, tmp_path):
    """``-m encoder=rwkv,rwkv7 encoder.model=…``: Hydra first composes the group's default option
    (glove, which has no ``model``); the override must still reach both options."""
    pytest.importorskip("pyrwkv_tokenizer", reason="the RWKV world tokenizer is not installed")
    from test_graded_and_postprocess import write_stsb

    from framework.__main__ import widen_option_overrides
    from framework.plugins import registry

    assert widen_option_overrides(["-m", "encoder=rwkv,rwkv7", "encoder.model=x"], registry()) == [
        "-m", "encoder=rwkv,rwkv7", "++encoder.model=x"]
    torch.save(random_state7(2, 64, None, 65536, seed=1), tmp_path / "seven.pth")
    folder = write_stsb(tmp_path / "STS-B")
    result = run_cli("-m", "encoder=rwkv,rwkv7", f"encoder.model={tmp_path / 'seven.pth'}", "encoder.device=cpu", "dataset=stsb",
                     f"dataset.data_dir={folder}", "metric=spearman", "metric.bootstrap_resamples=50")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [r for r in result.runs() if "layerprobe.layer" in r.data.tags]
    assert sorted(r.data.params["encoder.version"] for r in runs) == ["7", "null"]
    assert all(r.data.params["encoder.model"] == str(tmp_path / "seven.pth") for r in runs)
