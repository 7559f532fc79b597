"""``dataset=mteb``: an MTEB task's pairs in a layerprobe sweep, scored by MTEB's own evaluator too.

    python -m framework -m dataset=mteb dataset.task=STSBenchmark,SICK-R layer=0,2,4,6 encoder=minilm

Any STS or PairClassification task of mteb 2.x (``dataset.task``; ``dataset.split``, ``dataset.subset``
for multilingual tasks). Its pairs go through the job like any dataset's (graded scores for STS,
0/1 labels for PairClassification), so the run has layerprobe's Spearman with its bootstrap CI; and
the task's own evaluator (``task.evaluate``) scores the same vectors the cosine compares, logged as
``mteb.<score>`` metrics (``mteb.main_score`` among them). ``dataset.local`` points at the task's
data saved with ``datasets``' ``save_to_disk`` (a DatasetDict of its splits, or of subsets holding
splits): no hub. Without it, mteb loads the task's data from the hub (online). Needs
``pip install 'layerprobe[mteb]'`` (tested with mteb 2.26.24).
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np

from framework.data import PairSet
from framework.errors import LayerprobeError
from framework.hookspecs import hookimpl

TASK_TYPES = {"STS": "graded", "PairClassification": "binary"}


@dataclass
class MtebOptions:
    task: str = "STSBenchmark"  # an MTEB STS or PairClassification task
    subset: str | None = None  # a multilingual task's subset (hf_subset); null: "default" (or its only one)
    local: str | None = None  # the task's data saved with datasets' save_to_disk; null: mteb loads it from the hub


class MtebDataset:
    def __init__(self, options: MtebOptions):
        try:
            import mteb
        except ImportError:
            raise LayerprobeError("dataset=mteb needs the mteb package: pip install 'layerprobe[mteb]'") from None
        try:
            task = mteb.get_task(options.task)
        except Exception as error:  # KeyError / ValueError with mteb's own list of names
            first = (str(error).splitlines() or [""])[0][:160]
            raise LayerprobeError(f"dataset.task={options.task}: not an MTEB task ({first}); e.g. STSBenchmark, SICK-R, "
                                  "SprintDuplicateQuestions") from None
        kind = task.metadata.type
        if kind not in TASK_TYPES:
            raise LayerprobeError(f"dataset.task={options.task} is an MTEB {kind} task; dataset=mteb scores sentence pairs: "
                                  "use an STS or PairClassification task")
        self.options, self.task = options, task
        self.label_kind = TASK_TYPES[kind]
        self._loaded = False
        # The splits there are: a local folder's own (read now: memory-mapped); else the task's evaluation splits
        self.splits = tuple(self._split_names()) if options.local else tuple(task.metadata.eval_splits)

    def _split_names(self) -> list[str]:
        data = self._data()
        subset = self.options.subset or "default"
        first = next(iter(data.values()), None)
        if first is not None and not hasattr(first, "column_names"):  # {subset: {split: Dataset}}
            return list(data.get(subset, first))
        return list(data)

    def _data(self):
        if not self._loaded:
            if self.options.local:
                from datasets import load_from_disk

                try:
                    self.task.dataset = load_from_disk(self.options.local)
                except (FileNotFoundError, ValueError) as error:
                    raise LayerprobeError(f"dataset.local={self.options.local}: not a datasets save_to_disk folder ({error}); "
                                          "save the task's DatasetDict with save_to_disk, or set dataset.local=null") from None
                self.task.data_loaded = True
            else:
                try:
                    self.task.load_data()
                except Exception as error:  # offline, gated, moved: many exception types
                    first = (str(error).splitlines() or [""])[0][:160]
                    raise LayerprobeError(f"dataset.task={self.options.task}: mteb could not load its data ({type(error).__name__}: "
                                          f"{first}); offline? save it with save_to_disk and set dataset.local") from None
            self._loaded = True
        return self.task.dataset

    def _split_data(self, split: str):
        data = self._data()
        subset = self.options.subset or "default"
        first = next(iter(data.values()), None)
        if first is not None and hasattr(first, "column_names"):  # one subset: {split: Dataset}
            if split not in data:
                raise LayerprobeError(f"dataset.split={split}: {self.options.task} has splits {', '.join(data)}")
            return data[split], subset
        if subset not in data:
            raise LayerprobeError(f"dataset.subset={subset}: {self.options.task} has subsets {', '.join(list(data)[:8])}; "
                                  "set dataset.subset")
        if split not in data[subset]:
            raise LayerprobeError(f"dataset.split={split}: {self.options.task}/{subset} has splits {', '.join(data[subset])}")
        return data[subset][split], subset

    def load(self, split: str, limit: int | None) -> PairSet:
        if limit is not None and limit < 1:
            raise LayerprobeError(f"dataset.limit={limit} must be a positive number of rows (or null for all)")
        rows, subset = self._split_data(split)
        first_column, second_column = self._columns()
        label_column = "score" if self.label_kind == "graded" else getattr(self.task, "label_column_name", "labels")
        a, b, labels = (list(rows[c]) for c in (first_column, second_column, label_column))
        if a and isinstance(a[0], list):  # the older layout: one row holding lists
            a, b, labels = (sum(column, []) for column in (a, b, labels))
        whole = len(a)
        read = whole if limit is None else min(limit, whole)  # the first ``limit`` rows, as every dataset reads them
        skipped: Counter = Counter()
        kept = []
        for i in range(read):
            try:
                value = float(labels[i])
            except (TypeError, ValueError):
                skipped["bad_label"] += 1
                continue
            if not np.isfinite(value):
                skipped["bad_label"] += 1
                continue
            kept.append((i, value))
        pairs = PairSet(f"mteb:{self.options.task}", split, [str(i) for i, _ in kept], [str(a[i]) for i, _ in kept],
                        [str(b[i]) for i, _ in kept], np.array([v for _, v in kept], dtype=np.float64), read, skipped,
                        source=f"mteb:{self.options.task}/{subset}/{split}", label_kind=self.label_kind)
        partial = None if read == whole and not skipped else f"{read} of {whole} rows read, {sum(skipped.values())} skipped"
        pairs.evaluator = lambda vectors: self._evaluate(vectors, split, subset, partial)
        return pairs

    def _columns(self) -> tuple[str, str]:
        if self.label_kind == "graded":
            names = getattr(self.task, "column_names", ("sentence1", "sentence2"))
            return str(names[0]), str(names[1])
        return str(getattr(self.task, "input1_column_name", "sentence1")), str(getattr(self.task, "input2_column_name", "sentence2"))

    def _evaluate(self, vectors, split: str, subset: str, partial: str | None) -> dict[str, float]:
        """The task's own evaluator over the vectors the job compared (looked up by sentence); not
        run (said on stderr) when the job evaluated only part of the split: MTEB scores whole splits."""
        if partial is not None:
            print(f"layerprobe: warning: dataset=mteb: MTEB's own evaluator scores whole splits, so it is not run on "
                  f"{self.options.task}/{split} ({partial}); layerprobe's metrics cover the pairs kept", file=sys.stderr, flush=True)
            return {}
        from framework.mteb_model import LookupModel

        scores = self.task.evaluate(LookupModel(vectors), split=split, subsets_to_run=[subset], encode_kwargs={})
        (values,) = scores.values()
        return {f"mteb.{k}": float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@hookimpl
def register_datasets(register):
    register("mteb", MtebDataset, MtebOptions)
