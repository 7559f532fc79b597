"""The configured set of metrics: values, seeded bootstrap CIs, train-calibrated thresholds.

Which metrics apply depends on the evaluated data: binary-label metrics are left out on graded
labels (with a note), and metrics of the embedding space get the vectors, not the pair scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from framework.bootstrap import confusion_at_thresholds, resample_counts, resample_indices, resampled_confusion
from framework.data import MetricValue, PairScores, SentenceVectors
from framework.errors import LayerprobeError
from framework.plugins import Metric, Registry

MAX_THRESHOLD_CANDIDATES = 4096


@dataclass
class MetricSet:
    metrics: list[Metric]
    resamples: int
    confidence: float
    calibration_split: str | None
    calibration_limit: int | None

    @classmethod
    def from_config(cls, config: DictConfig, registry: Registry) -> "MetricSet":
        names = list(config.get("names") or [])
        if not names:
            raise LayerprobeError("metric.names is empty; list at least one metric, e.g. metric.names=[spearman]")
        confidence = float(config.get("confidence", 0.95))
        if not 0 < confidence < 1:
            raise LayerprobeError(f"metric.confidence={confidence} must lie between 0 and 1, e.g. 0.95")
        resamples = int(config.get("bootstrap_resamples", 1000))
        if resamples < 0:
            raise LayerprobeError(f"metric.bootstrap_resamples={resamples} must be ≥ 0 (0 turns the CI off)")
        return cls([registry.metric(n) for n in names], resamples, confidence,
                   config.get("calibration_split"), config.get("calibration_limit"))

    def for_labels(self, label_kind: str) -> tuple["MetricSet", list[str]]:
        """The metrics that mean something for ``label_kind`` labels, and a note about the others."""
        if label_kind == "binary":
            return self, []
        kept = [m for m in self.metrics if m.labels != "binary"]
        dropped = [m.name for m in self.metrics if m.labels == "binary"]
        notes = [f"{', '.join(dropped)} need binary labels: not computed on {label_kind} labels (no made-up threshold)"] if dropped else []
        return MetricSet(kept, self.resamples, self.confidence, self.calibration_split, self.calibration_limit), notes

    @property
    def needs_calibration(self) -> bool:
        return self.calibration_split is not None and any(m.calibrated for m in self.metrics)

    @property
    def needs_vectors(self) -> bool:
        return any(m.inputs == "vectors" for m in self.metrics)

    def compute(self, evaluated: PairScores, calibration: PairScores | None, seed: int,
                vectors: SentenceVectors | None = None) -> list[MetricValue]:
        """Every metric on the evaluated pairs; all resample the same seeded bootstrap indices.

        Metrics with a batched form are evaluated on all resamples together, chunk by chunk (one
        pass over the resamples for all of them); the others on each materialised resample.
        """
        scores, labels = evaluated.scores, evaluated.pairs.labels
        values: list[MetricValue] = []
        batched: dict[int, object] = {}  # position in values → f(counts)
        scalar: dict[int, object] = {}  # position in values → f(scores, labels)
        for metric in self.metrics:
            if metric.inputs == "vectors":
                if vectors is not None:
                    values.append(MetricValue(metric.name, float(metric.function(vectors, seed))))
                continue
            if metric.calibrated:
                if calibration is None:
                    continue  # no calibration split configured: logged as a note by the caller
                threshold = best_threshold(metric, calibration.scores, calibration.pairs.labels)
                value = MetricValue(metric.name, float(metric.function(scores, labels, threshold)), extras={"threshold": threshold})
                if metric.confusion is not None:
                    batched[len(values)] = _confusion_of_resamples(metric, scores >= threshold, labels > 0.5)
                else:
                    scalar[len(values)] = lambda s, l, metric=metric, t=threshold: metric.function(s, l, t)
            else:
                value = MetricValue(metric.name, float(metric.function(scores, labels)))
                if metric.batched is not None:
                    batched[len(values)] = metric.batched(scores, labels)
                else:
                    scalar[len(values)] = metric.function
            values.append(value)
        if self.resamples:
            replicates = {i: [] for i in (*batched, *scalar)}
            if batched:
                for counts in resample_counts(len(scores), self.resamples, seed):
                    for i, of in batched.items():
                        replicates[i].append(np.asarray(of(counts), dtype=np.float64))
            if scalar:
                samples = resample_indices(len(scores), self.resamples, seed)
                for i, function in scalar.items():
                    replicates[i].append(np.array([function(scores[s], labels[s]) for s in samples], dtype=np.float64))
            for i, parts in replicates.items():
                self._add_ci(values[i], np.concatenate(parts))
        return values

    def _add_ci(self, value: MetricValue, replicates: np.ndarray) -> None:
        """Percentile CI of the finite replicates; none for an undefined (NaN) point value."""
        replicates = replicates[np.isfinite(replicates)]
        if not len(replicates) or not np.isfinite(value.value):
            return
        tail = (1 - self.confidence) / 2 * 100
        low, high = np.percentile(replicates, [tail, 100 - tail])
        value.ci_low, value.ci_high = float(low), float(high)


def _confusion_of_resamples(metric: Metric, predicted: np.ndarray, positive: np.ndarray):
    return lambda counts: metric.confusion(*resampled_confusion(predicted, positive, counts))


def best_threshold(metric: Metric, scores: np.ndarray, labels: np.ndarray) -> float:
    """The score threshold (predict paraphrase if score ≥ t) that maximises the metric.

    Candidates are the operating points of scikit-learn's ROC curve (every distinct score), thinned
    evenly to at most ``MAX_THRESHOLD_CANDIDATES`` on very large splits.
    """
    from sklearn.metrics import roc_curve

    positive = labels > 0.5
    if positive.all() or not positive.any():
        candidates = np.unique(scores)
    else:
        candidates = roc_curve(positive, scores, drop_intermediate=False)[2]
        candidates = candidates[np.isfinite(candidates)]
    if len(candidates) > MAX_THRESHOLD_CANDIDATES:
        candidates = candidates[np.linspace(0, len(candidates) - 1, MAX_THRESHOLD_CANDIDATES).round().astype(int)]
    if metric.confusion is not None:
        values = metric.confusion(*confusion_at_thresholds(scores, positive, candidates))
    else:
        values = [metric.function(scores, labels, t) for t in candidates]
    return float(candidates[int(np.argmax(values))])
