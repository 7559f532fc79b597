"""finetune=contrastive on RWKV-6: a differentiable WKV, trained through sentence-transformers'
trainer, tuned once per sweep, and a tuned folder that both layerprobe and sentence-transformers
read back to the same embeddings."""

from __future__ import annotations

import json

import pytest
import torch

from test_graded_and_postprocess import write_stsb

pytest.importorskip("sentence_transformers", reason="fine-tuning needs pip install 'layerprobe[finetune]'")
pytest.importorskip("accelerate", reason="fine-tuning needs pip install 'layerprobe[finetune]'")
pytest.importorskip("pyrwkv_tokenizer", reason="the RWKV world tokenizer is not installed")


@pytest.fixture(scope="module")
def world_pth(tmp_path_factory):
    """2 blocks, hidden 64 (one head), the world vocabulary: the tokenizer's ids all fit."""
    from plugins.rwkv.random_checkpoint import random_state

    path = tmp_path_factory.mktemp("rwkv") / "world.pth"
    torch.save(random_state(2, 64, 224, 65536, seed=3), path)
    return path


def test_the_chunked_wkv_has_the_step_by_step_gradients():
    """Autograd through the chunked WKV (both of its branches: a chunk that decays below e^-60
    takes the exact log-space form) gives the gradients of the step-by-step recurrence."""
    from plugins.rwkv.wkv import wkv6_chunked, wkv6_reference

    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 40, 70, 1])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.long)
    cu[1:] = lengths.cumsum(0)
    T, H, N = int(lengths.sum()), 2, 8
    weights = torch.randn(T, H, N, generator=g)
    for scale in (0.5, 3.0):  # mild decays: the one-matmul chunks; strong ones: the exact form
        leaves = [torch.randn(T, H, N, generator=g).requires_grad_(True) for _ in range(4)] + [
            torch.randn(H, N, generator=g).requires_grad_(True)]
        grads = {}
        for wkv in (wkv6_chunked, wkv6_reference):
            for leaf in leaves:
                leaf.grad = None
            r, k, v, w, u = leaves
            out = wkv(r, k, v, torch.exp(-torch.exp(w * scale)), u, cu)
            (out * weights).sum().backward()
            grads[wkv] = [leaf.grad.clone() for leaf in leaves]
        for ours, reference in zip(grads[wkv6_chunked], grads[wkv6_reference]):
            assert float((ours - reference).abs().max() / reference.abs().max()) <= 1e-5


def test_rwkv_tunes_once_per_sweep_and_its_folder_reads_back_the_same_embeddings(run_cli, tmp_path, world_pth):
    folder = write_stsb(tmp_path / "STS-B")
    args = ("-m", "encoder=rwkv", f"encoder.model={world_pth}", "pooler=mean", "dataset=stsb", f"dataset.data_dir={folder}",
            "metric=spearman", "metric.bootstrap_resamples=50", "layer=0,2", "finetune=contrastive", "finetune.batch_size=4",
            "finetune.lr=1e-3")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("finetune: training") == 1
    runs = [r for r in result.runs() if "layerprobe.layer" in r.data.tags]
    assert sorted(r.data.params["tuned.origin"] for r in runs) == ["cache", "computed"]
    assert all(r.data.params["tuned.loss"] == "cosent" for r in runs)
    trainer = next(r for r in runs if r.data.params["tuned.origin"] == "computed")
    assert len(result.client().get_metric_history(trainer.info.run_id, "tuned.loss")) == 2  # 6 pairs, batches of 4
    (tuned,) = [p for p in (result.store / "finetuned").iterdir() if p.is_dir() and not p.name.startswith(".")]
    manifest = json.loads((tuned / "layerprobe-finetune.json").read_text())
    assert {"model.safetensors", "rwkv_config.json", "modules.json"} <= set(manifest["files"])

    # The weights moved (every block), and the tuned folder is what both readers embed alike.
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from plugins.rwkv.encoder import RWKVEncoder, RWKVOptions

    base, trained = torch.load(world_pth, weights_only=True), load_file(tuned / "model.safetensors")
    assert set(base) == set(trained)
    for block in (0, 1):
        key = f"blocks.{block}.att.key.weight"
        assert not torch.equal(base[key], trained[key]), key
    sentences = ["A man is playing a guitar.", "x", "Two dogs run across the field, barking at the mailman."]
    library = SentenceTransformer(str(tuned), device="cpu", trust_remote_code=True).encode(sentences, convert_to_tensor=True)
    encoder = RWKVEncoder(RWKVOptions(model=str(tuned), device="cpu"))
    for batch in encoder.encode(sentences, encoder.resolve_layer(-1)):
        mask = batch.mask.float()[..., None]
        means = (batch.states * mask).sum(1) / mask.sum(1)
        for index, mean in zip(batch.sentence_index.tolist(), means):
            assert torch.allclose(mean, library[index], atol=1e-5), index

    # Deterministic on CPU: the same settings in another store train to the same bytes.
    other = tmp_path / "other"
    again = run_cli(*[a for a in args if a not in ("-m", "layer=0,2")], "layer=2", f"tracking.dir={other}")
    assert again.returncode == 0, again.stderr[-3000:]
    (retrained,) = [p for p in (other / "finetuned").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert retrained.name == tuned.name
    files = json.loads((retrained / "layerprobe-finetune.json").read_text())["files"]
    assert files["model.safetensors"] == manifest["files"]["model.safetensors"]


@pytest.mark.parametrize("arguments, message", [
    (("finetune.method=lora",), "finetune.method=lora needs a transformers model"),
    (("finetune.loss=adaptive_layer",), "finetune.loss=adaptive_layer needs a transformers model"),
    (("finetune.precision=fp16",), "finetune.precision=fp16: use auto, fp32 or bf16"),
])
def test_what_an_rwkv_model_cannot_train_is_one_line_before_any_run(run_cli, tmp_path, world_pth, arguments, message):
    folder = write_stsb(tmp_path / "STS-B")
    result = run_cli("encoder=rwkv", f"encoder.model={world_pth}", "pooler=mean", "dataset=stsb", f"dataset.data_dir={folder}",
                     "metric=spearman", "finetune=contrastive", *arguments)
    assert result.returncode == 2, result.stderr[-3000:]
    assert any(message in line for line in result.error_lines), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not [r for r in result.runs() if "layerprobe.layer" in r.data.tags or r.info.status == "FAILED"]


def test_rwkv7_trains_through_the_same_module_and_reads_back(run_cli, tmp_path):
    """RWKV-7 (x070) through the same trainable module: its step-by-step WKV has autograd's gradients."""
    from plugins.rwkv.random_checkpoint import random_state7

    seven = tmp_path / "seven.pth"
    torch.save(random_state7(2, 64, None, 65536, seed=4), seven)
    folder = write_stsb(tmp_path / "STS-B")
    result = run_cli("encoder=rwkv7", f"encoder.model={seven}", "pooler=mean", "dataset=stsb", f"dataset.data_dir={folder}",
                     "metric=spearman", "metric.bootstrap_resamples=50", "finetune=contrastive", "finetune.batch_size=4",
                     "finetune.lr=1e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    (tuned,) = [p for p in (result.store / "finetuned").iterdir() if p.is_dir() and not p.name.startswith(".")]
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from plugins.rwkv.encoder import RWKVEncoder, RWKVOptions

    base, trained = torch.load(seven, weights_only=True), load_file(tuned / "model.safetensors")
    assert set(trained) == set(base) - {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}  # x070 never reads those
    assert not torch.equal(base["blocks.1.att.w1"], trained["blocks.1.att.w1"])
    sentences = ["A man is playing a guitar.", "Two dogs run across the field."]
    library = SentenceTransformer(str(tuned), device="cpu", trust_remote_code=True).encode(sentences, convert_to_tensor=True)
    encoder = RWKVEncoder(RWKVOptions(model=str(tuned), version=7, device="cpu"))
    for batch in encoder.encode(sentences, encoder.resolve_layer(-1)):
        mask = batch.mask.float()[..., None]
        means = (batch.states * mask).sum(1) / mask.sum(1)
        for index, mean in zip(batch.sentence_index.tolist(), means):
            assert torch.allclose(mean, library[index], atol=1e-5), index
