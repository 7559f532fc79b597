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


# --- full and read-only disks: a real tmpfs of a few KB (root can mount one; else these skip) -------

@pytest.fixture
def small_disk(tmp_path):
    """``mount(folder, size)`` mounts a tmpfs of ``size`` there; all are unmounted at the end."""
    import os

    mounted = []

    def mount(folder, size="8m", *options):
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            pytest.skip("a tmpfs needs root to mount (a full disk is simulated by a real small filesystem)")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder):
    """Write zeros until the filesystem under ``folder`` has no byte left."""
    with open(folder / "filler", "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
        except OSError:
            pass


def one_line_error(result, *words):
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.error_lines if line.startswith("layerprobe: error:")]
    assert len(errors) == 1 and all(word in errors[0] for word in words), result.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("template", [False, True], ids=["migrating", "copying the empty-store template"])
def test_a_new_store_on_a_full_disk_is_one_line_and_leaves_no_broken_database(run_cli, tmp_path, small_disk, tiny_mrpc, tiny_vectors,
                                                                              template):
    job = (f"encoder.vectors={tiny_vectors}", f"dataset.data_dir={tiny_mrpc}", "metric=spearman")
    env = {"LAYERPROBE_CACHE_DIR": str(tmp_path / "cache-home")}
    if template:  # a first store elsewhere leaves the template behind
        assert run_cli(*job, f"tracking.dir={tmp_path / 'elsewhere'}", env=env).returncode == 0
        assert list((tmp_path / "cache-home").glob("mlflow-*-empty.db"))
    disk = small_disk(tmp_path / "disk")
    fill(disk)
    result = run_cli(*job, f"tracking.dir={disk / 'mlruns'}", f"hydra.run.dir={tmp_path / 'hydra'}", env=env)
    line = one_line_error(result, str(disk / "mlruns" / "mlflow.db"), "cannot write the MLflow store")
    expected = f"no space left on the device (writing {disk / 'mlruns' / 'mlflow.db'})" if template else "disk is full"
    assert expected in line, line
    assert not (disk / "mlruns" / "mlflow.db").exists()  # a half-migrated database would break every later run
    assert not [p for p in (disk / "mlruns").iterdir() if p.name.endswith(".tmp")]  # nor a half-copied one


def test_a_full_disk_under_an_existing_store_is_one_line_and_leaves_no_run_running(run_cli, tmp_path, small_disk, tiny_mrpc, tiny_vectors):
    from mlflow.tracking import MlflowClient

    disk = small_disk(tmp_path / "disk")
    job = (f"encoder.vectors={tiny_vectors}", f"dataset.data_dir={tiny_mrpc}", "metric=spearman", f"tracking.dir={disk / 'mlruns'}")
    assert run_cli(*job, f"hydra.run.dir={tmp_path / 'h0'}").returncode == 0
    fill(disk)
    result = run_cli(*job, "pooler=max", f"hydra.run.dir={tmp_path / 'h1'}")
    one_line_error(result, str(disk / "mlruns" / "mlflow.db"), "disk is full")
    (disk / "filler").unlink()
    runs = MlflowClient(f"sqlite:///{disk / 'mlruns' / 'mlflow.db'}").search_runs(["1"])
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_an_artifact_that_does_not_fit_is_never_logged_truncated_and_resume_replays_the_result(run_cli, tmp_path, small_disk, tiny_vectors):
    """The store takes the run, its artifact folder fills up mid-way: one line naming the file, the run
    FAILED (not RUNNING, not later 'stale'), no partial scores.csv, the computed result kept; once there
    is room, resume=true records it into that same run, scores and all."""
    from conftest import MRPC_ROWS, write_mrpc
    from mlflow.tracking import MlflowClient

    from plugins.mlflow.tracker import read_scores

    data = write_mrpc(tmp_path / "MRPC", rows=MRPC_ROWS * 40)
    store = tmp_path / "mlruns"
    job = (f"encoder.vectors={tiny_vectors}", f"dataset.data_dir={data}", "metric=spearman", f"tracking.dir={store}",
           f"hydra.run.dir={tmp_path / 'hydra' / 'day' / 'run'}")
    artifacts = small_disk(store / "artifacts" / "layerprobe", "4k")  # one page: config.yaml fits, scores.csv does not
    result = run_cli(*job)
    line = one_line_error(result, "no space left", str(artifacts), ".csv", "resume=true")
    (kept,) = (tmp_path / "hydra").glob("*/*/unrecorded/*.json")
    assert str(kept) in line
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    (run,) = client.search_runs(["1"])
    assert run.info.status == "FAILED" and "no space left" in run.data.tags["error"]
    assert not list(artifacts.rglob("*.csv")) and not list(artifacts.rglob("*.tmp"))  # none half-written
    assert list(artifacts.rglob("config.yaml"))  # what fitted is there, whole

    subprocess.run(["umount", "-l", str(artifacts)], check=True)
    resumed = run_cli(*job, "resume=true")
    assert resumed.returncode == 0 and "replayed " in resumed.stdout, resumed.stderr[-3000:]
    kept_result = json.loads(kept.with_name(kept.name + ".replayed").read_text())
    (run,) = client.search_runs(["1"])
    assert run.info.status == "FINISHED" and run.data.metrics["spearman"] == kept_result["metrics"]["spearman"]
    scores = read_scores(client, run.info.run_id)
    assert scores.scores == kept_result["scores"]["scores"] and len(scores.ids) == len(MRPC_ROWS) * 40
    again = run_cli(*job, "resume=true")  # replayed once: now it is the store's finished run that is reused
    assert "reused " in again.stdout and "replayed " not in again.stdout


def test_sqlite_on_a_read_only_filesystem_is_one_line(run_cli, tmp_path, small_disk, tiny_mrpc, tiny_vectors):
    disk = small_disk(tmp_path / "disk")
    job = (f"encoder.vectors={tiny_vectors}", f"dataset.data_dir={tiny_mrpc}", "metric=spearman")
    assert run_cli(*job, f"tracking.dir={disk}", f"hydra.run.dir={tmp_path / 'h0'}").returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    for store in (disk / "mlflow.db", disk / "other.db"):
        result = run_cli(*job, f"tracking.uri=sqlite:///{store}", f"tracking.dir={tmp_path / 'local'}", f"hydra.run.dir={tmp_path / 'h1'}")
        one_line_error(result, str(store), "Read-only file system")


def test_a_cache_folder_that_takes_no_writes_degrades_to_memory_with_a_warning(tmp_path, small_disk, capsys):
    disk = small_disk(tmp_path / "cache", "64k")
    cache = TokenStateCache(str(disk), 1.0)
    encoder = CachedEncoder(CountingEncoder(), cache)
    states = torch.zeros(64, 256, 16)  # 1 MiB: does not fit
    batch = TokenStates(states, torch.ones(64, 256, dtype=torch.bool), torch.arange(64))
    cache.put("k", [batch], encode_seconds=100.0)  # expensive to recompute: meant for the disk
    assert cache.unwritable is not None and "No space left" in cache.unwritable
    assert "caching in memory only" in capsys.readouterr().err
    assert cache.get("k") is not None and not list(disk.glob("*")) # kept in memory, nothing half-written on disk
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    again = CachedEncoder(CountingEncoder(), TokenStateCache(str(disk), 1.0))
    assert len(list(again.encode(["a", "b"], Layer()))) == 1  # the lock folder cannot be made: computed, unlocked
    assert again.cache.unwritable is not None


def test_a_sweep_whose_artifacts_fill_the_disk_stops_and_leaves_nothing_running(run_cli, tmp_path, small_disk, tiny_vectors):
    from conftest import MRPC_ROWS, write_mrpc
    from mlflow.tracking import MlflowClient

    data = write_mrpc(tmp_path / "MRPC", rows=MRPC_ROWS * 40)
    store = tmp_path / "mlruns"
    small_disk(store / "artifacts" / "layerprobe", "4k")
    result = run_cli("-m", f"encoder.vectors={tiny_vectors}", f"dataset.data_dir={data}", "metric=spearman",
                     "pooler=mean,max", f"tracking.dir={store}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert any("no space left" in line and "stopping the sweep" in line for line in result.error_lines), result.stderr[-3000:]
    runs = MlflowClient(f"sqlite:///{store / 'mlflow.db'}").search_runs(["1"])
    assert runs and all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    assert list(tmp_path.glob("mlruns/hydra/*/*/summary/summary.md"))  # the summary is kept beside the sweep
