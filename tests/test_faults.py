"""A fault battery's cases: damaged or odd input is said loudly, never turned into a silent number."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from conftest import REPO
from framework.cache import CachedEncoder, TokenStateCache
from framework.data import Layer, TokenStates


class CountingEncoder:
    calls = 0

    def fingerprint(self):
        return "f"

    def encode(self, sentences, layer):
        CountingEncoder.calls += 1
        states = torch.arange(len(sentences) * 4 * 16, dtype=torch.float32).reshape(len(sentences), 4, 16)
        yield TokenStates(states, torch.ones(len(sentences), 4, dtype=torch.bool), torch.arange(len(sentences)))


def cached_states(folder):
    encoder = CachedEncoder(CountingEncoder(), TokenStateCache(str(folder), 1.0))
    return encoder, list(encoder.encode(["a", "b", "c"], Layer()))


def test_a_cache_entry_with_overwritten_numbers_is_detected_and_recomputed(tmp_path, capsys):
    """Float noise written over the tensor data (the file's structure intact) fails the checksum."""
    _, first = cached_states(tmp_path)
    (path,) = tmp_path.glob("*.pt")
    with zipfile.ZipFile(path) as archive:
        member = next(m for m in archive.infolist() if "/data/" in m.filename)
    raw = bytearray(path.read_bytes())
    start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    raw[start:start + 64] = np.random.default_rng(0).normal(size=16).astype(np.float32).tobytes()
    path.write_bytes(bytes(raw))
    calls = CountingEncoder.calls
    encoder, again = cached_states(tmp_path)
    assert CountingEncoder.calls == calls + 1 and encoder.stats["cache_damaged"] == 1
    assert all(torch.equal(a.states, b.states) for a, b in zip(first, again))
    assert "checksum" in capsys.readouterr().err


def test_an_empty_cache_entry_is_damaged_not_fatal(tmp_path, capsys):
    key = TokenStateCache.key("f", None, ["a", "b", "c"])
    torch.save({"batches": [], "encode_seconds": 0.5}, tmp_path / f"{key}.pt")
    encoder, batches = cached_states(tmp_path)
    assert encoder.stats["cache_damaged"] == 1 and len(batches) == 1
    assert "unreadable" in capsys.readouterr().err


def pairs_args(path, *extra):
    return ("encoder=glove", "dataset=pairs", f"dataset.files={{validation: {path}}}", "metric=spearman", *extra)


def test_a_long_sentence_in_a_csv_is_data(run_cli, tmp_path, tiny_vectors):
    path = tmp_path / "long.csv"
    rows = ["sentence1,sentence2,label"] + [f"the cat sat {i},{'a cat sat ' * 100_000},{i % 2}" for i in range(6)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    result = run_cli(*pairs_args(path, f"encoder.vectors={tiny_vectors}"))
    assert result.returncode == 0, result.stderr[-1500:]
    assert "n=6 skipped=0" in result.stdout


def test_only_bytes_actually_replaced_are_counted(run_cli, tmp_path, tiny_vectors):
    path = tmp_path / "pairs.csv"
    text = "sentence1,sentence2,label\nthe cat \ufffd sat,a cat sat,1\nstocks fell,the dog barked,0\nthe dog,a dog,1\n"
    path.write_bytes(text.encode("utf-8") + b"markets rose \xe2\x82,the cat sat,0\n")
    result = run_cli(*pairs_args(path, f"encoder.vectors={tiny_vectors}"))
    assert result.returncode == 0, result.stderr[-1500:]
    (run,) = [r for r in result.runs() if "data.rows_read" in r.data.params]
    assert run.data.params["data.rows_invalid_utf8_replaced"] == "1"  # the truncated byte, not the literal U+FFFD


def test_an_unclosed_quote_is_a_one_line_error_naming_the_row(run_cli, tmp_path, tiny_vectors):
    path = tmp_path / "quotes.csv"
    lines = ["sentence1,sentence2,label"] + [f"the cat {i},a cat {i},{i % 2}" for i in range(9)]
    lines += ['"the dog barked,the dog,1'] + [f"stocks fell {i},markets rose {i},{i % 2}" for i in range(89)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_cli(*pairs_args(path, f"encoder.vectors={tiny_vectors}"))
    assert result.returncode == 2
    assert len(result.error_lines) == 1 and "row 9" in result.error_lines[0] and "quote" in result.error_lines[0], result.stderr


def test_non_text_sentences_are_a_one_line_error(run_cli, tmp_path, tiny_vectors):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"sentence1": [25, 26], "sentence2": [[1.0, 2.0], [3.0]], "label": [1, 0]}), path)
    result = run_cli(*pairs_args(path, f"encoder.vectors={tiny_vectors}"))
    assert result.returncode == 2
    assert len(result.error_lines) == 1 and "sentence1" in result.error_lines[0] and "not text" in result.error_lines[0], result.stderr


def test_a_report_never_creates_a_store(tmp_path):
    missing = tmp_path / "nowhere"
    done = subprocess.run([sys.executable, "-m", "framework.report", "--tracking-uri", f"sqlite:///{missing}/x.db"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no MLflow store" in done.stderr and not missing.exists()


@pytest.mark.parametrize("name", ["../../escape", "/tmp/absolute", "a/b"])
def test_an_experiment_name_is_a_name_not_a_path(run_cli, tiny_mrpc, tiny_vectors, name):
    result = run_cli(f"encoder.vectors={tiny_vectors}", f"dataset.data_dir={tiny_mrpc}", f"tracking.experiment={name}")
    assert result.returncode == 2
    assert len(result.error_lines) == 1 and "tracking.experiment" in result.error_lines[0], result.stderr
    assert not (result.store.parent / "escape").exists()


def test_markdown_that_mlflow_renders_is_escaped():
    from framework.summary import markdown

    text = markdown(["note"], [["<script>alert(1)</script> | x"]])
    assert "<script>" not in text and "&lt;script&gt;" in text and "\\|" in text


def test_a_pickled_hf_checkpoint_is_refused_in_one_line(tmp_path):
    """A pytorch_model.bin that unpickles more than tensors: refused by weights_only, said in one line."""
    pytest.importorskip("transformers")
    import os
    import pickle

    from framework.errors import LayerprobeError
    from plugins.hf import HFEncoder, HFOptions

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10, "hidden_size": 8,
                                                     "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8}))
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"weight": Payload()}, handle)
    with pytest.raises(LayerprobeError, match="refused|cannot load"):
        HFEncoder(HFOptions(model=str(folder))).fingerprint()
    assert not (tmp_path / "ran").exists()


def test_a_symlink_loop_as_tracking_dir_is_one_line(run_cli, tmp_path, tiny_mrpc, tiny_vectors):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    result = run_cli(f"encoder.vectors={tiny_vectors}", f"dataset.data_dir={tiny_mrpc}", f"tracking.dir={loop}",
                     f"hydra.run.dir={tmp_path / 'hydra'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-1500:]
    assert len(result.error_lines) == 1 and "tracking.dir" in result.error_lines[0]


def test_a_metric_that_is_undefined_on_real_data_is_said(capsys, tmp_path):
    """Sentences with no known word: every score is the same, Spearman is NaN, and the run says so."""
    from framework.api import evaluate
    from conftest import write_glove_text

    vectors = write_glove_text(tmp_path / "vectors.txt")
    pairs = [("zzz qqq", "xxx yyy", 1), ("www vvv", "uuu ttt", 0), ("sss rrr", "ppp ooo", 1), ("nnn mmm", "lll kkk", 0)]
    result = evaluate({"name": "glove", "vectors": str(vectors)}, "mean", pairs=pairs, metrics=["spearman"])
    value = result.metric("spearman")
    assert np.isnan(value.value) and value.ci_low is None
    assert any("spearman undefined (NaN)" in note for note in result.notes)
    assert "spearman undefined (NaN)" in capsys.readouterr().err


def test_a_damaged_pooled_vector_entry_is_counted_and_recomputed(tmp_path, capsys):
    from framework.run import embed
    from plugins.pooling import MeanPooler

    def embedded():
        encoder = CachedEncoder(CountingEncoder(), TokenStateCache(str(tmp_path), 1.0))
        return encoder, embed(["a", "b", "c"], encoder, MeanPooler(), Layer(), "name: mean")

    _, first = embedded()
    (path,) = tmp_path.glob("pooled-*.pt")
    path.write_bytes(path.read_bytes()[:-40])  # truncated
    encoder, again = embedded()
    assert encoder.stats["cache_damaged"] == 1 and "cache_hits_pooled" not in encoder.stats
    assert torch.equal(first.vectors, again.vectors)
    encoder, third = embedded()
    assert encoder.stats["cache_hits_pooled"] == 1 and third.origin == "cache" and torch.equal(first.vectors, third.vectors)
    assert "unreadable" in capsys.readouterr().err


def test_a_fitted_pooler_entry_with_scalar_tensors_round_trips(tmp_path):
    """What the attention pooler learned (a query and a 0-dimensional temperature) is written and
    read back whole: the checksum covers tensors of every shape."""
    from plugins.attention_pooling import AttentionOptions, AttentionPooler

    pooler = AttentionPooler(AttentionOptions())
    pooler._ensure_query(16, "cpu")
    learned = pooler.learned()
    cache = TokenStateCache(str(tmp_path), 1.0)
    cache.put_entry("k", "fitted-", {"learned": learned, "curve": {"loss": [0.5]}, "fit_seconds": 1.0, "encode_seconds": 0.1})
    stored = cache.get_entry("k", "fitted-")
    assert cache.damaged == 0 and stored["curve"] == {"loss": [0.5]}
    assert torch.equal(stored["learned"]["attention_pooler"]["temperature"], learned["attention_pooler"]["temperature"])
    restored = AttentionPooler(AttentionOptions())
    restored.restore(stored["learned"])
    assert torch.equal(restored.query, pooler.query)
