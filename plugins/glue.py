"""GLUE sentence-pair datasets: MRPC and QQP (binary paraphrase labels) and STS-B (graded 0–5
similarity scores), from the Hugging Face hub or a local GLUE-layout folder.

Local TSVs are read byte-wise, line by line, with CSV quoting off: MRPC sentences contain
unbalanced double quotes that make a quoting CSV reader merge rows silently. Lines that are not
valid UTF-8 are decoded with replacement characters and counted, not dropped. A label that is not
a number is a counted skip; a number other than 0/1 in a binary dataset (MRPC, QQP) means the file
is not what the task says it is, and is a one-line error naming the line.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from framework.data import PairSet
from framework.errors import LayerprobeError
from framework.hookspecs import hookimpl

SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}


@dataclass
class GlueOptions:
    """Options of a GLUE dataset (split and limit are the harness's). Without data_dir or data_root, the hub is used."""

    data_dir: str | None = None
    data_root: str | None = None
    hub_id: str = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    name: str
    folder: str
    sentence_a: str
    sentence_b: str
    label: str
    id_column: str | None
    hub_a: str
    hub_b: str
    graded: bool = False  # labels are similarity scores (STS-B: 0–5), not 0/1

    @property
    def label_kind(self) -> str:
        return "graded" if self.graded else "binary"


MRPC = GlueTask("mrpc", "MRPC", "#1 String", "#2 String", "Quality", None, "sentence1", "sentence2")
QQP = GlueTask("qqp", "QQP", "question1", "question2", "is_duplicate", "id", "question1", "question2")
STSB = GlueTask("stsb", "STS-B", "sentence1", "sentence2", "score", "index", "sentence1", "sentence2", graded=True)


class GlueDataset:
    def __init__(self, task: GlueTask, options: GlueOptions):
        self.task = task
        self.hub_id = options.hub_id
        self.data_dir = _local_folder(task, options)

    @property
    def label_kind(self) -> str:
        return self.task.label_kind

    @property
    def splits(self) -> tuple[str, ...]:
        """Splits that can be loaded: all three from the hub, those with a file in a local folder."""
        if self.data_dir is None:
            return tuple(SPLIT_FILES)
        return tuple(s for s, f in SPLIT_FILES.items() if (self.data_dir / f).is_file())

    def load(self, split: str, limit: int | None = None) -> PairSet:
        if split not in SPLIT_FILES:
            raise LayerprobeError(f"{self.task.name} has no split '{split}'; choose one of {', '.join(SPLIT_FILES)}")
        if limit is not None and limit < 1:
            raise LayerprobeError(f"dataset.limit={limit} must be a positive number of rows (or null for all)")
        if self.data_dir is not None:
            return read_glue_tsv(self.data_dir / SPLIT_FILES[split], self.task, split, limit)
        return self._load_hub(split, limit)

    def _load_hub(self, split: str, limit: int | None) -> PairSet:
        import datasets

        try:
            rows = datasets.load_dataset(self.hub_id, self.task.name, split=split)
        except Exception as error:  # the hub client raises many types; all mean "could not get it"
            first_line = (str(error).splitlines() or [""])[0][:200]
            raise LayerprobeError(
                f"could not load {self.hub_id}/{self.task.name} ({split}) from the Hugging Face hub: "
                f"{type(error).__name__}: {first_line} — offline? set dataset.data_dir=<GLUE {self.task.folder} folder> or data_root=<folder of GLUE folders>"
            ) from None
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        return pairs_from_hub_rows(rows, self.task, split, f"hub:{self.hub_id}/{self.task.name}")


def _local_folder(task: GlueTask, options: GlueOptions) -> Path | None:
    if options.data_dir:
        folder = Path(options.data_dir).expanduser()
        if not folder.is_dir():
            raise LayerprobeError(
                f"dataset.data_dir={options.data_dir} is not a folder; point it at a GLUE {task.folder} folder "
                f"holding {', '.join(SPLIT_FILES.values())}, or leave it unset to load from the hub"
            )
        return folder
    if options.data_root:
        folder = Path(options.data_root).expanduser() / task.folder
        if not folder.is_dir():
            raise LayerprobeError(
                f"data_root={options.data_root} has no {task.folder} folder; it must hold GLUE-layout folders "
                f"(<data_root>/{task.folder}/dev.tsv …)"
            )
        return folder
    return None


def read_glue_tsv(path: Path, task: GlueTask, split: str, limit: int | None) -> PairSet:
    """Read a GLUE TSV exactly: every data line is a pair, or a skip counted under its reason."""
    if not path.is_file():
        raise LayerprobeError(f"{path}: no such file; the {split} split of a local {task.name} folder is {SPLIT_FILES[split]}")
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if not lines or not lines[0].strip():
        raise LayerprobeError(f"{path} is empty; expected a GLUE {task.folder} TSV with a header line")
    header = lines[0].rstrip(b"\r").decode("utf-8", errors="replace").lstrip("\ufeff").split("\t")
    columns = {name: i for i, name in enumerate(header)}
    wanted = [task.sentence_a, task.sentence_b] + ([task.id_column] if task.id_column else [])
    if split != "test":
        wanted.append(task.label)
    for column in wanted:
        if column not in columns:
            raise LayerprobeError(f"{path}: missing column '{column}' (header has: {', '.join(header)}); is this a GLUE {task.folder} file?")
    label_at = columns.get(task.label)

    ids, sentences_a, sentences_b, labels = [], [], [], []
    skipped, notes = Counter(), Counter()
    rows_read = 0
    for number, raw in enumerate(lines[1:], start=1):
        if limit is not None and rows_read >= limit:
            break
        rows_read += 1
        raw = raw.rstrip(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            notes["invalid_utf8_replaced"] += 1
        fields = text.split("\t")
        if len(fields) != len(header):
            skipped["wrong_field_count"] += 1
            continue
        raw_label = fields[label_at].strip() if label_at is not None else ""
        if raw_label in ("", "-1"):
            skipped["unlabelled"] += 1
            continue
        label = parse_label(raw_label, task.graded, f"{path} line {number + 1}")
        if label is None:
            skipped["bad_label"] += 1
            continue
        ids.append(fields[columns[task.id_column]] if task.id_column else str(number - 1))
        sentences_a.append(fields[columns[task.sentence_a]])
        sentences_b.append(fields[columns[task.sentence_b]])
        labels.append(label)
    return PairSet(task.name, split, ids, sentences_a, sentences_b, np.asarray(labels, dtype=np.float64),
                   rows_read, skipped, notes, source=f"local:{path}", label_kind=task.label_kind)


def parse_label(text, graded: bool, where: str) -> float | None:
    """A label as a number; None (a counted skip) for one that is no number at all.

    For binary data a number other than 0 or 1 (a graded score, say) is an error naming ``where``.
    """
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(value):
        return None
    if not graded and value not in (0.0, 1.0):
        raise LayerprobeError(f"{where}: label {text!r} is not 0 or 1, but this dataset's labels are binary; "
                              "for graded scores use dataset=stsb or dataset=pairs dataset.label_kind=graded")
    return value


def pairs_from_hub_rows(rows, task: GlueTask, split: str, source: str) -> PairSet:
    """Convert a hub split (columns idx, label, and the two sentence columns) to a PairSet."""
    missing = [c for c in ("idx", "label", task.hub_a, task.hub_b) if c not in rows.column_names]
    if missing:
        raise LayerprobeError(f"{source} ({split}) lacks column(s) {', '.join(missing)}; is it a GLUE {task.name} copy?")
    ids, sentences_a, sentences_b, labels = [], [], [], []
    skipped = Counter()
    for number, row in enumerate(rows):
        if row["label"] is None or row["label"] == -1:
            skipped["unlabelled"] += 1
            continue
        label = parse_label(row["label"], task.graded, f"{source} ({split}) row {number}")
        if label is None:
            skipped["bad_label"] += 1
            continue
        if row[task.hub_a] is None or row[task.hub_b] is None:
            skipped["missing_sentence"] += 1
            continue
        ids.append(str(row["idx"]))
        sentences_a.append(row[task.hub_a])
        sentences_b.append(row[task.hub_b])
        labels.append(label)
    return PairSet(task.name, split, ids, sentences_a, sentences_b, np.asarray(labels, dtype=np.float64),
                   len(rows), skipped, Counter(), source=source, label_kind=task.label_kind)


@hookimpl
def register_datasets(register):
    for task in (MRPC, QQP, STSB):
        register(task.name, lambda options, task=task: GlueDataset(task, options), GlueOptions)
