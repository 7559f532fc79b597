"""``dataset=pairs``: your own sentence pairs, from local files or any Hugging Face dataset.

    dataset=pairs dataset.files={train: train.csv, validation: dev.jsonl}
    dataset=pairs dataset.hub=mteb/sickr-sts dataset.split=test dataset.label=score
    dataset=pairs dataset.hub=/path/to/folder/written/by/save_to_disk

Local files are CSV (standard quoting), TSV (no quoting: a quote is a character, as in GLUE), JSON
Lines, or Parquet, by suffix. Columns are mapped with ``dataset.sentence1``, ``sentence2``, ``label``
(and ``id``; default: the row number). Labels are ``binary`` (0/1) or ``graded`` (any number, e.g.
0–5): ``label_kind=auto`` infers it from the split (binary if every label is 0 or 1) and the run
logs it. Every row read is evaluated or counted: a missing sentence, an empty label, a label that
is no number, a malformed line are skips by reason; a missing column is a one-line error.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional

import numpy as np

from framework.data import LABEL_KINDS, PairSet
from framework.errors import LayerprobeError
from framework.hookspecs import hookimpl
from plugins.glue import parse_label

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclass
class PairsOptions:
    files: Optional[Dict[str, str]] = None  # split → local file (.csv, .tsv, .jsonl, .parquet)
    hub: Optional[str] = None  # a hub dataset id, or a folder written by datasets' save_to_disk
    config: Optional[str] = None  # the hub dataset's configuration (subset)
    revision: Optional[str] = None  # a hub branch, tag or commit
    sentence1: str = "sentence1"
    sentence2: str = "sentence2"
    label: str = "label"
    id: Optional[str] = None  # a column of pair ids; null = the row number
    label_kind: str = "auto"  # auto | binary | graded


class PairsDataset:
    @property
    def label_kind(self) -> str | None:
        """As configured; None for auto (known once a split is read)."""
        return None if self.options.label_kind == "auto" else self.options.label_kind

    def __init__(self, options: PairsOptions):
        if bool(options.files) == bool(options.hub):
            raise LayerprobeError("dataset=pairs needs exactly one of dataset.files={split: file, …} "
                                  "or dataset.hub=<hub id or save_to_disk folder>")
        if options.label_kind not in ("auto", *LABEL_KINDS):
            raise LayerprobeError(f"dataset.label_kind={options.label_kind}: use auto, binary or graded")
        self.options = options
        self.files = {split: Path(path).expanduser() for split, path in (options.files or {}).items()}
        for split, path in self.files.items():
            if path.suffix.lower() not in FORMATS:
                raise LayerprobeError(f"dataset.files.{split}={path}: unknown format; use .csv, .tsv, .jsonl or .parquet")
            if not path.is_file():
                raise LayerprobeError(f"dataset.files.{split}={path}: no such file")
        self._hub = None

    @property
    def splits(self) -> tuple[str, ...]:
        if self.files:
            return tuple(self.files)
        return tuple(self._hub_splits())

    def load(self, split: str, limit: int | None) -> PairSet:
        if split not in self.splits:
            raise LayerprobeError(f"dataset=pairs has no split '{split}' (it has: {', '.join(self.splits)}); "
                                  "set dataset.split, or name the file in dataset.files")
        if self.files:
            path = self.files[split]
            rows, skipped, notes = read_rows(path, limit)
            source = f"local:{path.resolve()}"
        else:
            rows, skipped, notes = self._hub_rows(split, limit)
            source = f"hub:{self.options.hub}" + (f"/{self.options.config}" if self.options.config else "")
        return self._pairs(rows, split, source, skipped, notes)

    def _pairs(self, rows: Iterable[tuple[int, dict[str, Any] | None]], split: str, source: str,
               skipped: Counter, notes: Counter) -> PairSet:
        """One pass over the rows (a stream for local files: no row is held beyond what it gives)."""
        o = self.options
        wanted = [o.sentence1, o.sentence2, o.label] + ([o.id] if o.id else [])
        kept: list[tuple[str, str, str, Any, int]] = []
        read, checked = 0, False
        for number, row in rows:
            read += 1
            if row is None:
                continue  # counted by the reader
            if not checked:
                missing = [c for c in wanted if c not in row]
                if missing:
                    raise LayerprobeError(f"{source} ({split}): no column {', '.join(map(repr, missing))} (it has: "
                                          f"{', '.join(map(str, row))}); map yours with dataset.sentence1/sentence2/label/id")
                checked = True
            a, b, label = row.get(o.sentence1), row.get(o.sentence2), row.get(o.label)
            if a is None or b is None:
                skipped["missing_sentence"] += 1
            elif not isinstance(a, str) or not isinstance(b, str):
                column, value = (o.sentence1, a) if not isinstance(a, str) else (o.sentence2, b)
                raise LayerprobeError(f"{source} ({split}) row {number}: column '{column}' holds {type(value).__name__} "
                                      f"{str(value)[:40]!r}, not text; map the sentence columns with dataset.sentence1/sentence2")
            elif label is None or (isinstance(label, str) and label.strip() in ("", "-1")) or label == -1:
                skipped["unlabelled"] += 1
            elif parse_label(label, True, "") is None:
                skipped["bad_label"] += 1
            else:
                kept.append((str(row[o.id]) if o.id else str(number), a, b, label, number))
        kind = o.label_kind
        if kind == "auto":
            values = {parse_label(label, True, "") for *_, label, _ in kept}
            kind = "binary" if values <= {0.0, 1.0} else "graded"
        labels = [parse_label(label, kind == "graded", f"{source} ({split}) row {number}") for *_, label, number in kept]
        return PairSet("pairs", split, [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept],
                       np.asarray(labels, dtype=np.float64), read, skipped, notes, source=source, label_kind=kind)

    # --- the hub (or a save_to_disk folder) -----------------------------------------------------

    def _hub_dataset(self):
        import datasets

        folder = Path(self.options.hub).expanduser()
        if folder.is_dir():
            try:
                loaded = datasets.load_from_disk(str(folder))
            except Exception as error:  # a foreign folder raises several types
                raise LayerprobeError(f"dataset.hub={self.options.hub}: not a folder written by save_to_disk ({type(error).__name__})") from None
            if not isinstance(loaded, datasets.DatasetDict):
                raise LayerprobeError(f"dataset.hub={self.options.hub} holds one split without a name; save a DatasetDict "
                                      "({'train': …, 'validation': …}) with save_to_disk")
            return loaded
        return None

    def _hub_splits(self) -> list[str]:
        if self._hub is None:
            self._hub = self._hub_dataset() or False
        if self._hub:
            return list(self._hub)
        import datasets

        try:
            return datasets.get_dataset_split_names(self.options.hub, self.options.config, revision=self.options.revision)
        except Exception as error:  # offline, unknown dataset, gated: many exception types
            raise LayerprobeError(f"dataset.hub={self.options.hub}: could not reach it on the Hugging Face hub "
                                  f"({type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}); offline? "
                                  "save it with save_to_disk and give that folder, or use dataset.files") from None

    def _hub_rows(self, split: str, limit: int | None):
        if self._hub:
            rows = self._hub[split]
        else:
            import datasets

            try:
                rows = datasets.load_dataset(self.options.hub, self.options.config, revision=self.options.revision, split=split)
            except Exception as error:  # see _hub_splits
                raise LayerprobeError(f"dataset.hub={self.options.hub} ({split}): could not load it "
                                      f"({type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]})") from None
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        return enumerate(rows), Counter(), Counter()


def read_rows(path: Path, limit: int | None) -> tuple[Iterator[tuple[int, dict | None]], Counter, Counter]:
    """Rows of a local file, streamed, as (row number, dict or None for a counted bad row); the skip
    and note counters fill as the rows are read."""
    kind = FORMATS[path.suffix.lower()]
    skipped, notes = Counter(), Counter()
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise LayerprobeError(f"{path}: not a Parquet file ({type(error).__name__}: {str(error)[:120]})") from None
        records = table.slice(0, limit).to_pylist() if limit is not None else table.to_pylist()
        return iter(enumerate(records)), skipped, notes
    # Bytes that are not UTF-8 become lone surrogates here, so the rows that hold them (and only
    # those: a literal U+FFFD in valid text is data) are counted, then given U+FFFD as usual.
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    if not text.strip():
        raise LayerprobeError(f"{path} is empty")
    return _limited_rows(text, kind, path, limit, skipped, notes), skipped, notes


def _limited_rows(text: str, kind: str, path: Path, limit: int | None, skipped: Counter, notes: Counter):
    given = 0
    for number, row in _records(text, kind, path, skipped):
        if limit is not None and given >= limit:
            return
        if row is not None and any(isinstance(v, str) and INVALID_BYTES.search(v) for v in row.values()):
            notes["invalid_utf8_replaced"] += 1
            row = {k: INVALID_BYTES.sub("\ufffd", v) if isinstance(v, str) else v for k, v in row.items()}
        given += 1
        yield number, row


def _lines(text: str) -> Iterator[str]:
    """``text``'s lines with their endings, split at "\n" only (csv joins a quoted field's lines
    itself), without the 4-bytes-per-character copy that ``io.StringIO`` makes."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


INVALID_BYTES = re.compile("[\udc80-\udcff]+")  # how errors="surrogateescape" decodes bytes that are not UTF-8
csv.field_size_limit(2**31 - 1)  # a long sentence is data, as in JSONL or TSV (the default limit is 128 KiB)


def _records(text: str, kind: str, path: Path, skipped: Counter) -> Iterator[tuple[int, dict | None]]:
    """Blank lines are not rows; a malformed one is a row counted under its reason (None)."""
    if kind == "jsonl":
        number = 0
        for line in _lines(text):  # JSON text may hold U+2028 and other characters str.splitlines() splits at
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                skipped["bad_json"] += 1
                record = None
            yield number, record
            number += 1
        return
    quoting = csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL
    reader = csv.reader(_lines(text), delimiter="\t" if kind == "tsv" else ",", quoting=quoting)
    header = next(reader, None)
    if not header:
        raise LayerprobeError(f"{path}: no header line; the first line must name the columns")
    number = 0
    for fields in reader:
        if not fields or fields == [""]:
            continue
        spanning = next((f for f in fields if "\n" in f), None)
        if spanning is not None and kind == "csv":
            raise LayerprobeError(
                f"{path}: row {number} has a quoted field that runs over {spanning.count(chr(10)) + 1} lines — an unclosed "
                f"quote (\"…) would merge the rows after it; close the quote, or write sentences with line breaks as JSON Lines")
        if len(fields) != len(header):
            skipped["wrong_field_count"] += 1
            yield number, None
        else:
            yield number, dict(zip(header, fields))
        number += 1


@hookimpl
def register_datasets(register):
    register("pairs", PairsDataset, PairsOptions)
