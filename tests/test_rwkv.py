"""RWKV-6: parity with BlinkDL's official runtime, both checkpoint layouts, layers, batching, tokenizer."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from framework.data import Layer
from framework.errors import LayerprobeError
from plugins.rwkv.checkpoint import build_model, load_checkpoint
from plugins.rwkv.encoder import RWKVEncoder, RWKVOptions
from plugins.rwkv.random_checkpoint import random_state, to_hf_layout, write_hf_folder

os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")
LAYERS, HIDDEN, FFN = 4, 128, 448


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory):
    """4 layers, hidden 128, head 64, vocab 512: shapes as the official runtime expects."""
    path = tmp_path_factory.mktemp("rwkv") / "tiny6.pth"
    torch.save(random_state(LAYERS, HIDDEN, FFN, 512), path)
    return path


@pytest.fixture(scope="module")
def world_pth(tmp_path_factory):
    """The same small shape with the full 65536-token world vocabulary, for the tokenizer path."""
    path = tmp_path_factory.mktemp("rwkv") / "world6.pth"
    torch.save(random_state(LAYERS, HIDDEN, FFN, 65536, seed=1), path)
    return path


TOKENS = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(7))


def ours(path, tokens=TOKENS):
    return build_model(load_checkpoint(str(path)))


def official(path):
    from rwkv.model import RWKV

    return RWKV(model=str(path).removesuffix(".pth"), strategy="cpu fp32")


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_logits_match_the_official_runtime(tiny_pth):
    reference, _ = official(tiny_pth).forward(TOKENS.tolist(), None, full_output=True)
    logits = ours(tiny_pth).logits(TOKENS, torch.tensor([0, len(TOKENS)]))
    assert relative(logits, reference) <= 1e-4


@pytest.mark.parametrize("block", [0, 2])
def test_each_layer_is_that_blocks_output(tiny_pth, tmp_path, block):
    """The official runtime cut after ``block`` gives head(ln_out(x)); so must hidden_states[block]."""
    state = {k: v for k, v in torch.load(tiny_pth).items()
             if not k.startswith("blocks.") or int(k.split(".")[1]) <= block}
    torch.save(state, tmp_path / "cut.pth")
    reference, _ = official(tmp_path / "cut.pth").forward(TOKENS.tolist(), None, full_output=True)
    model = ours(tiny_pth)
    hidden = model.hidden_state(TOKENS, torch.tensor([0, len(TOKENS)]), block)
    logits = model.head(torch.nn.functional.layer_norm(hidden, (HIDDEN,), model.ln_out.weight, model.ln_out.bias))
    assert relative(logits, reference) <= 1e-4


def test_hugging_face_layout_gives_identical_hidden_states(tiny_pth, tmp_path):
    folder = write_hf_folder(torch.load(tiny_pth), tmp_path / "hf")
    blinkdl, hf = ours(tiny_pth), build_model(load_checkpoint(str(folder)))
    cu = torch.tensor([0, 10, len(TOKENS)])
    for index in range(LAYERS + 1):
        assert torch.equal(blinkdl.hidden_state(TOKENS, cu, index), hf.hidden_state(TOKENS, cu, index))
    assert "rwkv.blocks.0.attention.time_maa_w1" in to_hf_layout(torch.load(tiny_pth))


def encoder_for(path, **options):
    return RWKVEncoder(RWKVOptions(model=str(path), device="cpu", progress=False, **options))


def encode(encoder, sentences, layer):
    result = [None] * len(sentences)
    for batch in encoder.encode(sentences, layer):
        for row, sentence in enumerate(batch.sentence_index.tolist()):
            result[sentence] = batch.states[row][batch.mask[row]]
    return result


def test_batched_equals_one_at_a_time(world_pth):
    sentences = ["The cat sat on the mat.", "Stocks fell sharply on Tuesday after the report.",
                 "短い文", "Hi", "A much longer sentence, with commas, numbers like 2003 and emoji 🙂 too."]
    encoder = encoder_for(world_pth)
    layer = encoder.resolve_layer(2)
    together = encode(encoder, sentences, layer)
    alone = [encode(encoder, [s], layer)[0] for s in sentences]
    tight = encode(encoder_for(world_pth, batch_tokens=16), sentences, layer)
    for a, b, c in zip(together, alone, tight):
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-5 and float((a - c).abs().max()) <= 1e-5


def test_layers_follow_hugging_face_hidden_states(tiny_pth):
    encoder = encoder_for(tiny_pth)
    assert encoder.resolve_layer(None) == Layer(None, 4, 3)  # last entry: after ln_out
    assert encoder.resolve_layer(1) == Layer(1, 1, 1)
    assert encoder.resolve_layer(-1) == Layer(-1, 4, 3)
    assert encoder.resolve_layer(-5) == Layer(-5, 0, 0)
    for bad in (5, -6):
        with pytest.raises(LayerprobeError, match=r"out of range for this 4-block RWKV-6: use 0\.\.4"):
            encoder.resolve_layer(bad)


def test_layer_k_computes_only_up_to_block_k(tiny_pth, monkeypatch):
    model = ours(tiny_pth)
    ran = []
    for i, block in enumerate(model.blocks):
        monkeypatch.setattr(block, "forward", lambda x, packed, i=i, f=block.forward: ran.append(i) or f(x, packed))
    model.hidden_state(TOKENS, torch.tensor([0, len(TOKENS)]), 1)
    assert ran == [0, 1]


def test_empty_sentences_get_a_zero_state_and_are_counted(world_pth):
    encoder = encoder_for(world_pth)
    batches = list(encoder.encode(["", "hello world", ""], encoder.resolve_layer(1)))
    counts = sum((b.counts for b in batches), start=__import__("collections").Counter())
    assert counts["empty_sentences"] == 2 and counts["tokens"] == 2
    empty = next(b for b in batches if 0 in b.sentence_index.tolist())
    assert torch.equal(empty.states, torch.zeros_like(empty.states)) and empty.mask.sum() == 2


def test_token_ids_above_the_vocabulary_are_an_error(tiny_pth):
    encoder = encoder_for(tiny_pth)
    with pytest.raises(LayerprobeError, match="vocabulary has 512"):
        list(encoder.encode(["hello world"], encoder.resolve_layer(1)))


def test_token_ids_outside_the_vocabulary_are_caught_in_any_pack_before_the_model_sees_them(tiny_pth):
    """Ids are checked pack by pack: a bad id in a later pack is still an error, raised before that pack runs."""
    encoder = encoder_for(tiny_pth, batch_tokens=4)
    layer = encoder.resolve_layer(1)
    ran = []
    forward = encoder.model.hidden_state
    encoder.model.hidden_state = lambda tokens, *args: ran.append(tokens.tolist()) or forward(tokens, *args)
    for bad, message in ((512, "vocabulary has 512"), (-3, "token id -3 is negative")):
        ran.clear()
        with pytest.raises(LayerprobeError, match=message):
            list(encoder.encode_tokens([[1, 2, 3], [4, 5, 6], [7, bad, 8]], layer))
        assert ran and all(bad not in tokens for tokens in ran)


TOKENIZER_SENTENCES = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n", "", " ", "中文句子，包含标点。", "日本語のテキスト", "한국어 문장",
    "emoji 🙂👍🏽 and flags 🇫🇷", "mixed 中文 and English 123,456.78", "\u00a0non-breaking\u2009spaces",
]


def test_world_tokenizer_matches_the_official_one():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    import rwkv

    from plugins.rwkv.tokenizer import WorldTokenizer

    reference = TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))
    ours_ = WorldTokenizer()
    for sentence in TOKENIZER_SENTENCES:
        assert ours_.encode(sentence) == reference.encode(sentence), sentence
    assert ours_.encode_batch(TOKENIZER_SENTENCES) == [reference.encode(s) for s in TOKENIZER_SENTENCES]


def test_bad_checkpoints_are_one_line_errors(tmp_path, tiny_pth):
    cases = []
    with pytest.raises(LayerprobeError, match="no such file or folder") as e:
        load_checkpoint(str(tmp_path / "missing.pth"))
    cases.append(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayerprobeError, match="no config.json") as e:
        load_checkpoint(str(tmp_path / "empty"))
    cases.append(e)
    state = torch.load(tiny_pth)
    del state["blocks.0.att.time_maa_x"], state["blocks.0.att.time_maa_w1"]
    torch.save(state, tmp_path / "v5.pth")
    with pytest.raises(LayerprobeError, match="missing 'blocks.0.att.time_maa_w2'|missing 2 weight|missing 'blocks") as e:
        build_model(load_checkpoint(str(tmp_path / "v5.pth")))
    cases.append(e)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(LayerprobeError, match="cannot read it as a checkpoint") as e:
        load_checkpoint(str(tmp_path / "junk.pth"))
    cases.append(e)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(LayerprobeError, match="not a readable safetensors file") as e:
        load_checkpoint(str(tmp_path / "junk.safetensors"))
    cases.append(e)
    from safetensors.torch import save_file

    save_file({"emb.weight": torch.zeros(4, 4)}, str(tmp_path / "cut.safetensors"))
    whole = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[:-8])  # truncated: the last tensor ends past the file
    with pytest.raises(LayerprobeError, match="does not fit its shape or the file") as e:
        load_checkpoint(str(tmp_path / "cut.safetensors"))
    cases.append(e)
    state = torch.load(tiny_pth)
    state["blocks.1.ffn.key.weight"] = state["blocks.1.ffn.key.weight"][:, :64]
    torch.save(state, tmp_path / "wrong_shape.pth")
    with pytest.raises(LayerprobeError, match="size mismatch for blocks.1.ffn.key.weight") as e:
        build_model(load_checkpoint(str(tmp_path / "wrong_shape.pth")))
    cases.append(e)
    assert all("\n" not in str(c.value) for c in cases)


def test_fingerprint_follows_the_weights(tmp_path, tiny_pth):
    torch.save(random_state(LAYERS, HIDDEN, FFN, 512, seed=3), tmp_path / "other.pth")
    assert encoder_for(tiny_pth).fingerprint() == encoder_for(tiny_pth).fingerprint()
    assert encoder_for(tiny_pth).fingerprint() != encoder_for(tmp_path / "other.pth").fingerprint()


def test_sweep_over_layers_and_poolers_logs_layer_and_block(run_cli, tiny_mrpc, world_pth):
    result = run_cli("-m", "encoder=rwkv", f"encoder.model={world_pth}", "layer=1,3", "pooler=mean,last",
                     "dataset=mrpc", f"dataset.data_dir={tiny_mrpc}", "dataset.limit=16")
    assert result.returncode == 0, result.stderr
    jobs = [r for r in result.runs() if "layerprobe.layer" in r.data.tags]
    assert len(jobs) == 4 and all(r.info.status == "FINISHED" for r in jobs)
    assert sorted((r.data.tags["layerprobe.layer"], r.data.tags["layerprobe.block"], r.data.params["pooler.name"]) for r in jobs) == [
        ("1", "1", "last"), ("1", "1", "mean"), ("3", "3", "last"), ("3", "3", "mean")]
    assert all(r.data.metrics["encoder.tokens"] > 0 for r in jobs)


def test_a_baseline_without_layers_shares_a_sweep_over_layers_and_the_parent_answers(run_cli, tiny_mrpc, tiny_vectors, world_pth):
    """GloVe beside RWKV layers in one sweep: GloVe runs once (the other layer values are the same
    config, not failures); each encoder's own options apply to it alone; the sweep's parent run
    holds the best config per dataset, the shared settings and the summary as a numeric table."""
    import csv
    from pathlib import Path

    result = run_cli("-m", "encoder=glove,rwkv", f"encoder.model={world_pth}", f"encoder.vectors={tiny_vectors}",
                     "layer=1,3", "pooler=mean", "dataset=mrpc", f"dataset.data_dir={tiny_mrpc}", "dataset.limit=16",
                     "metric=spearman", "metric.calibration_split=null", "metric.bootstrap_resamples=50")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 job(s), 4 finished, 1 with the config of another job" in result.stdout
    (parent,) = result.parents()
    children = result.children(parent)
    assert sorted((r.data.params["encoder.name"], r.data.params["layer"]) for r in children) == [
        ("glove", "null"), ("rwkv", "1"), ("rwkv", "3")]
    assert all(r.info.status == "FINISHED" for r in children)
    assert "encoder.model" not in next(r for r in children if r.data.params["encoder.name"] == "glove").data.params
    best = max(children, key=lambda r: r.data.metrics["spearman"])
    assert parent.data.metrics["best.spearman.mrpc_validation"] == best.data.metrics["spearman"]
    assert parent.data.metrics["best.spearman.mrpc_validation.ci_low"] == best.data.metrics["spearman_ci_low"]
    winner = next(r for r in children if r.info.run_id == parent.data.tags["best.spearman.mrpc_validation.run"])
    assert winner.data.metrics["spearman"] == best.data.metrics["spearman"]  # (a tie may pick either)
    assert parent.data.tags["best.spearman.mrpc_validation.layer"] == winner.data.tags["layerprobe.layer"]
    assert parent.data.params["dataset.limit"] == "16" and "encoder.name" not in parent.data.params  # shared settings only
    assert not parent.data.tags["mlflow.runName"].count("tracking.dir")
    artifacts = Path(parent.info.artifact_uri.removeprefix("file://"))
    rows = list(csv.DictReader((artifacts / "summary.csv").read_text().splitlines()))
    assert len(rows) == 3 and {float(row["spearman"]) for row in rows} == {r.data.metrics["spearman"] for r in children}
    import json

    table = json.loads((artifacts / "summary_table.json").read_text())  # MLflow's table: summary.csv's numbers
    column = table["columns"].index("spearman")
    assert [row[column] for row in table["data"]] == pytest.approx([float(row["spearman"]) for row in rows], abs=1e-9)
    client = result.client()
    assert client.get_experiment_by_name("layerprobe").tags["mlflow.experimentKind"] == "custom_model_development"


def test_deeper_layer_resumes_from_a_cached_shallower_one(world_pth, tmp_path):
    from framework.cache import CachedEncoder, TokenStateCache

    sentences = ["The cat sat on the mat.", "", "Stocks fell sharply on Tuesday after the report."]
    inner = encoder_for(world_pth)
    cached = CachedEncoder(inner, TokenStateCache(str(tmp_path / "cache"), 1.0))
    list(cached.encode(sentences, inner.resolve_layer(1)))
    resumed = encode(cached, sentences, inner.resolve_layer(3))
    assert cached.stats == {"cache_misses": 2, "cache_resumed": 1, "cache_resumed_from_layer": 1}
    direct = encode(inner, sentences, inner.resolve_layer(3))
    assert all(float((a - b).abs().max()) <= 1e-5 for a, b in zip(resumed, direct))
    # A new process (fresh memory) finds layer 3 on disk.
    again = CachedEncoder(encoder_for(world_pth), TokenStateCache(str(tmp_path / "cache"), 1.0))
    from_disk = encode(again, sentences, inner.resolve_layer(3))
    assert again.stats == {"cache_hits": 1}
    assert all(torch.equal(a, b) for a, b in zip(from_disk, resumed))


def test_sweep_encodes_each_split_once_and_a_second_sweep_hits_the_cache(run_cli, tiny_mrpc, world_pth):
    args = ("-m", "encoder=rwkv", f"encoder.model={world_pth}", "layer=1,3", "pooler=mean,last",
            f"dataset.data_dir={tiny_mrpc}", "metric=spearman")
    assert run_cli(*args).returncode == 0
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    runs = [r for r in result.runs() if "layerprobe.layer" in r.data.tags]
    second = sorted(runs, key=lambda r: r.info.start_time)[-4:]
    assert all(r.data.metrics.get("encoder.cache_hits") == 1 and "encoder.cache_misses" not in r.data.metrics for r in second)
    earlier = sorted(runs, key=lambda r: r.info.start_time)[:4]
    misses = sum(r.data.metrics.get("encoder.cache_misses", 0) for r in earlier)
    assert misses == 2  # layer 1 once, layer 3 once (resumed from layer 1); the other pooler hits


def test_attention_pooler_trains_on_rwkv_states(world_pth):
    """Token states must be ordinary tensors (not inference-mode ones) so a pooler can learn on them."""
    import numpy as np

    from framework.data import PairSet
    from framework.run import token_states_of
    from plugins.attention_pooling import AttentionOptions, AttentionPooler

    sentences_a = ["the cat sat", "stocks fell", "a dog barked", "markets rose today", "it rained", "we left early"]
    sentences_b = ["a cat sat", "the dog slept", "a dog barked loudly", "rain fell", "it poured", "markets fell"]
    labels = np.array([1, 0, 1, 0, 1, 0], dtype=float)
    pairs = PairSet("toy", "train", [str(i) for i in range(6)], sentences_a, sentences_b, labels, 6)
    encoder = encoder_for(world_pth)
    curve = AttentionPooler(AttentionOptions(epochs=3, held_out_fraction=0.34)).fit(
        token_states_of(pairs, encoder, encoder.resolve_layer(2))[0], seed=0)
    assert len(curve["loss"]) >= 1


def test_a_legacy_pth_gets_a_conversion_message_and_the_converter_works(tmp_path, tiny_pth):
    import subprocess
    import sys

    from conftest import REPO

    legacy = tmp_path / "legacy.pth"
    torch.save(torch.load(tiny_pth), legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(LayerprobeError, match=r"legacy \(non-zip\) format.*python -m plugins.rwkv.convert") as error:
        load_checkpoint(str(legacy))
    assert "\n" not in str(error.value)
    converted = tmp_path / "legacy.safetensors"
    done = subprocess.run([sys.executable, "-m", "plugins.rwkv.convert", str(legacy), str(converted)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cu = torch.tensor([0, len(TOKENS)])
    assert torch.equal(ours(converted).hidden_state(TOKENS, cu, 2), ours(tiny_pth).hidden_state(TOKENS, cu, 2))


def test_a_job_served_from_the_cache_reports_what_computing_its_states_cost(run_cli, tiny_mrpc, world_pth):
    args = ("encoder=rwkv", f"encoder.model={world_pth}", "layer=2", f"dataset.data_dir={tiny_mrpc}", "metric=spearman")
    assert run_cli(*args).returncode == 0
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    fresh, cached = sorted((r for r in second.runs()), key=lambda r: r.info.start_time)
    assert fresh.data.params["states"] == "computed" and cached.data.params["states"] == "cache"
    assert cached.data.metrics["encode_seconds"] == pytest.approx(fresh.data.metrics["encode_seconds"], rel=1e-6)
    assert cached.data.metrics["cache_read_seconds"] > 0 and fresh.data.metrics["cache_read_seconds"] == 0
    ratio = cached.data.metrics["pairs_per_second"] / fresh.data.metrics["pairs_per_second"]
    assert 0.5 < ratio < 2, ratio  # like with like: not a cache read against an encode


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_chunked_wkv_equals_the_step_by_step_recurrence(chunk):
    """The CPU path (chunks, matmuls, carried state) against the float32 reference, decays near 0 and near 1 included."""
    from plugins.rwkv.wkv import wkv6_chunked, wkv6_reference

    g = torch.Generator().manual_seed(chunk)
    lengths = torch.tensor([1, 5, 17, 45, 12, 16, 32])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    T, H, N = int(lengths.sum()), 2, 64
    r, k, v = (torch.randn(T, H, N, generator=g) for _ in range(3))
    decay = torch.exp(-torch.exp(torch.rand(T, H, N, generator=g) * 8 - 6))
    u = torch.randn(H, N, generator=g) * 0.3
    expected = wkv6_reference(r, k, v, decay, u, cu)
    got = wkv6_chunked(r, k, v, decay, u, cu, chunk=chunk)
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
