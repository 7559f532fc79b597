"""The configured set of metrics: values, seeded bootstrap CIs, train-calibrated thresholds.

Which metrics apply depends on the evaluated data: binary-label metrics are left out on graded
labels (with a note), and metrics of the embedding space get the vectors, not the pair scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

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
        """Every metric on the evaluated pairs; all resample the same seeded bootstrap indices."""
        scores, labels = evaluated.scores, evaluated.pairs.labels
        samples = np.random.default_rng(seed).integers(0, len(scores), size=(self.resamples, len(scores)))
        values = []
        for metric in self.metrics:
            if metric.inputs == "vectors":
                if vectors is not None:
                    values.append(MetricValue(metric.name, float(metric.function(vectors, seed))))
                continue
            if metric.calibrated:
                if calibration is None:
                    continue  # no calibration split configured: logged as a note by the caller
                threshold = best_threshold(metric, calibration.scores, calibration.pairs.labels)
                value = self._with_ci(metric.name, lambda s, l: metric.function(s, l, threshold), scores, labels, samples)
                value.extras["threshold"] = threshold
            else:
                value = self._with_ci(metric.name, metric.function, scores, labels, samples)
            values.append(value)
        return values

    def _with_ci(self, name, function, scores, labels, samples) -> MetricValue:
        point = function(scores, labels)
        if not len(samples):
            return MetricValue(name, point)
        replicates = np.array([function(scores[i], labels[i]) for i in samples])
        replicates = replicates[np.isfinite(replicates)]
        if not len(replicates):
            return MetricValue(name, point)
        tail = (1 - self.confidence) / 2 * 100
        low, high = np.percentile(replicates, [tail, 100 - tail])
        return MetricValue(name, point, float(low), float(high))


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
    values = [metric.function(scores, labels, t) for t in candidates]
    return float(candidates[int(np.argmax(values))])
