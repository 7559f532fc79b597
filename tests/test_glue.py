"""GLUE loading: every row evaluated or counted, bad files are one-line errors, hub rows convert."""

import numpy as np
import pytest

from conftest import MRPC_HEADER, SHARED_GLUE, needs_shared_data, write_mrpc
from framework.errors import LayerprobeError
from plugins.glue import MRPC, QQP, GlueDataset, GlueOptions, pairs_from_hub_rows, read_glue_tsv


def local(task, folder, **options):
    return GlueDataset(task, GlueOptions(data_dir=str(folder), **options))


def test_unbalanced_quotes_bad_utf8_and_bad_rows_are_all_accounted_for(tmp_path):
    folder = tmp_path / "MRPC"
    folder.mkdir()
    body = b"\n".join([
        MRPC_HEADER.encode(),
        b'1\t1\t2\t"He said so\tHe said so',  # unbalanced quote: must stay its own row
        b"0\t3\t4\tcaf\xc3\xa9 ok\tbroken \xe2\x82 bytes",  # invalid UTF-8: kept, counted
        b"1\t5\t6\tonly three fields",  # too few fields: skipped, counted
        b"x\t7\t8\tbad label\there",  # label not 0/1: skipped, counted
        b"0\t9\t10\tlast\trow\r",  # CRLF line ending
    ]) + b"\n"
    (folder / "dev.tsv").write_bytes(body)
    pairs = local(MRPC, folder).load("validation")
    assert pairs.rows_read == 5
    assert len(pairs) == 3
    assert pairs.skipped == {"wrong_field_count": 1, "bad_label": 1}
    assert pairs.notes == {"invalid_utf8_replaced": 1}
    assert pairs.sentences_a[0] == '"He said so'
    assert "\ufffd" in pairs.sentences_b[1]
    assert pairs.sentences_b[2] == "row"
    assert pairs.labels.tolist() == [1, 0, 0]
    assert pairs.counts()["rows_skipped"] == 2


def test_limit_reads_only_the_first_rows(tiny_mrpc):
    pairs = local(MRPC, tiny_mrpc).load("train", limit=3)
    assert pairs.rows_read == 3 and len(pairs) == 3
    assert pairs.ids == ["0", "1", "2"]


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"),
    ("", "is empty"),
    ("Quality\t#1 ID\t#2 ID\t#1 String\n1\t1\t2\thello\n", "missing column '#2 String'"),
])
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, content, expected):
    folder = tmp_path / "MRPC"
    folder.mkdir()
    if content is not None:
        (folder / "dev.tsv").write_text(content)
    with pytest.raises(LayerprobeError) as error:
        local(MRPC, folder).load("validation")
    message = str(error.value)
    assert expected in message and "dev.tsv" in message and "\n" not in message


def test_folders_are_checked_where_they_enter(tmp_path):
    with pytest.raises(LayerprobeError, match="dataset.data_dir=.*is not a folder"):
        GlueDataset(MRPC, GlueOptions(data_dir=str(tmp_path / "missing")))
    with pytest.raises(LayerprobeError, match="has no QQP folder"):
        GlueDataset(QQP, GlueOptions(data_root=str(tmp_path)))


def test_data_root_finds_the_task_folder_and_lists_only_present_splits(tmp_path):
    write_mrpc(tmp_path / "MRPC", splits=("dev.tsv",))
    dataset = GlueDataset(MRPC, GlueOptions(data_root=str(tmp_path)))
    assert dataset.splits == ("validation",)
    assert len(dataset.load("validation")) == 8
    with pytest.raises(LayerprobeError, match="no split 'dev'"):
        dataset.load("dev")


def test_hub_rows_convert_and_unlabelled_rows_are_counted():
    import datasets

    rows = datasets.Dataset.from_dict({
        "sentence1": ["a b", "c d", "e f"], "sentence2": ["a c", "c e", "f g"],
        "label": [1, 0, -1], "idx": [0, 1, 2],
    })
    pairs = pairs_from_hub_rows(rows, MRPC, "test", "hub:nyu-mll/glue/mrpc")
    assert pairs.ids == ["0", "1"] and pairs.labels.tolist() == [1, 0]
    assert pairs.rows_read == 3 and pairs.skipped == {"unlabelled": 1}


def test_hub_loading_calls_datasets_and_reports_failure_in_one_line(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name, split):
        calls.append((path, name, split))
        if split == "train":
            raise ConnectionError("Couldn't reach the hub\nretry later")
        return datasets.Dataset.from_dict({"question1": ["q"], "question2": ["r"], "label": [1], "idx": [7]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    dataset = GlueDataset(QQP, GlueOptions())
    pairs = dataset.load("validation")
    assert calls == [("nyu-mll/glue", "qqp", "validation")]
    assert pairs.ids == ["7"] and pairs.source == "hub:nyu-mll/glue/qqp"
    with pytest.raises(LayerprobeError) as error:
        dataset.load("train")
    assert "ConnectionError" in str(error.value) and "data_dir" in str(error.value) and "\n" not in str(error.value)


@needs_shared_data
def test_real_mrpc_counts():
    dataset = local(MRPC, SHARED_GLUE / "MRPC")
    train, dev = dataset.load("train"), dataset.load("validation")
    assert (len(train), train.rows_skipped) == (3668, 0)
    assert (len(dev), dev.rows_skipped) == (408, 0)


@needs_shared_data
def test_real_qqp_counts_keep_invalid_utf8_rows():
    pairs = local(QQP, SHARED_GLUE / "QQP").load("validation")
    assert len(pairs) == 10000 and pairs.rows_skipped == 0
    assert int(np.sum(pairs.labels)) == 5000
    assert pairs.notes["invalid_utf8_replaced"] == 83
