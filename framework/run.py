"""One evaluation, in one direction: dataset → encoder → pooler → post-process → cosine → metrics.

Tracking is not done here: ``evaluate`` returns an ``Evaluation``; ``framework.job`` hands it to
the configured trackers.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from framework.cache import CachedEncoder, TokenStateCache, timed
from framework.data import Layer, MetricValue, PairScores, PairSet, PairTokenStates, SentenceVectors, TokenStates
from framework.errors import LayerprobeError
from framework.metricset import MetricSet
from framework.plugins import Registry
from framework.stages import LearnedPooler, cache_token_states, learned_tensors, needs_fit


@dataclass
class Embedding:
    """Pooled vectors of a list of sentences, and what it cost to make them.

    ``compared`` are the vectors the cosine compares (after any post-processing).
    """

    vectors: torch.Tensor
    encoder_counts: Counter
    encode_seconds: float
    pool_seconds: float
    sentences: list[str] = field(default_factory=list)
    compared: torch.Tensor | None = None
    origin: str = "computed"  # where the token states came from: computed | cache | continued
    read_seconds: float = 0.0  # time spent reading them from the cache
    waited_seconds: float = 0.0  # wall time of the encoder calls (computing, or reading the cache)


@dataclass
class Evaluation:
    """Everything a job produced, for the tracker and the result line."""

    layer: Layer
    scores: PairScores
    metrics: list[MetricValue]
    encoder_counts: Counter
    timings: dict[str, float]
    calibration: PairSet | None = None
    training_curve: dict[str, list[float]] = field(default_factory=dict)
    learned: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    mistakes: list[dict[str, Any]] = field(default_factory=list)
    states: str = "computed"  # where the evaluated split's token states came from

    @property
    def pairs(self) -> PairSet:
        return self.scores.pairs

    def metric(self, name: str) -> MetricValue | None:
        return next((m for m in self.metrics if m.name == name), None)

    def logged_metrics(self) -> dict[str, float]:
        """Every number of the job, flat: metrics with CIs and fitted extras, timings, counts, memory."""
        metrics: dict[str, float] = {"n_pairs": len(self.pairs), **self.timings, **self.memory}
        for value in self.metrics:
            metrics[value.name] = value.value
            if value.ci_low is not None:
                metrics[f"{value.name}_ci_low"], metrics[f"{value.name}_ci_high"] = value.ci_low, value.ci_high
            metrics.update({f"{value.name}_{key}": extra for key, extra in value.extras.items()})
        metrics.update({f"encoder.{key}": count for key, count in self.encoder_counts.items()})
        return {key: float(value) for key, value in metrics.items()}

    def logged_params(self) -> dict[str, str]:
        """What the job found out about its input: row accounting, data source, resolved layer."""
        params = {f"data.{key}": value for key, value in self.pairs.counts().items()}
        params["data.source"] = self.pairs.source
        params["data.label_kind"] = self.pairs.label_kind
        params["states"] = self.states
        params["layer_index"] = self.layer.label  # "-" for encoders without layers
        params["block_index"] = "-" if self.layer.block is None else self.layer.block
        if self.calibration is not None:
            params["calibration.split"] = self.calibration.split
            params["calibration.pairs"] = len(self.calibration)
        return {key: str(value) for key, value in params.items()}


def evaluate(cfg: DictConfig, registry: Registry, components: dict[str, Any] | None = None) -> Evaluation:
    """Run the job that ``cfg`` describes. Bad input raises ``LayerprobeError`` before any work.

    ``components`` may hold objects already built (``dataset``, ``encoder``, ``pooler``): the Python
    API passes a model or pairs held in memory this way; the rest is built from ``cfg``.
    """
    components = components or {}
    dataset = components.get("dataset") or registry.build("dataset", cfg.dataset)
    encoder = components.get("encoder") or shared_encoder(registry, cfg.encoder)
    if cfg.get("cache") and cfg.cache.get("enabled", True) and cache_token_states(encoder):
        encoder = CachedEncoder(encoder, token_state_cache(cfg.cache.get("dir"), float(cfg.cache.get("max_gb", 8))))
    pooler = components.get("pooler") or registry.build("pooler", cfg.pooler)
    postprocessor = registry.build("postprocessor", cfg.postprocess) if cfg.get("postprocess") else None
    metric_set = MetricSet.from_config(cfg.metric, registry)
    layer = encoder.resolve_layer(cfg.get("layer"))
    split = cfg.dataset.get("split", "validation")
    if not split:
        raise LayerprobeError("dataset.split is not set; e.g. dataset.split=validation")
    torch.manual_seed(int(cfg.seed))

    limit = cfg.dataset.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise LayerprobeError(f"dataset.limit={limit} must be a positive number of rows (or null for all)")
    pairs = dataset.load(split, limit)
    if not len(pairs):
        raise LayerprobeError(f"{pairs.dataset}/{split} has no labelled pair to evaluate ({pairs.rows_read} rows read, skipped: {dict(pairs.skipped)})")

    metric_set, notes = metric_set.for_labels(pairs.label_kind)
    training_curve: dict[str, list[float]] = {}
    learned: dict[str, Any] = {}
    if isinstance(pooler, LearnedPooler):
        train_split = cfg.pooler.get("train_split", "train")
        train = _load_other_split(dataset, train_split, cfg.pooler.get("train_limit"), "pooler.train_split")
        training_curve = pooler.fit(token_states_of(train, encoder, layer), int(cfg.seed)) or {}
        learned = learned_tensors(pooler)
    if postprocessor is not None and needs_fit(postprocessor):
        option = "postprocess.train_split"
        fit_split = cfg.postprocess.get("train_split", "train")
        if fit_split == split:
            raise LayerprobeError(f"{option}={fit_split} is the evaluated split; post-processing must be fit on another "
                                  "(e.g. postprocess.train_split=train)")
        fit_pairs = _load_other_split(dataset, fit_split, cfg.postprocess.get("train_limit"), option)
        # Statistics of the sentences as the pairs hold them (both sides, repeats kept, as in
        # BERT-whitening); each distinct sentence is still encoded once.
        fit_sentences, fit_a, fit_b = fit_pairs.unique_sentences()
        fit_vectors = embed(fit_sentences, encoder, pooler, layer).vectors
        fitted = postprocessor.fit(torch.cat([fit_vectors[fit_a], fit_vectors[fit_b]]), int(cfg.seed)) or {}
        learned.update({f"postprocess_{cfg.postprocess.name}": fitted} if fitted else {})
        notes.append(f"postprocess={cfg.postprocess.name} fit on the {2 * len(fit_pairs)} sentences of "
                     f"{len(fit_pairs)} {fit_pairs.dataset}/{fit_split} pairs")
    else:
        postprocessor = None

    calibration = None
    if metric_set.needs_calibration and metric_set.calibration_split not in dataset.splits:
        notes.append(f"no {metric_set.calibration_split} split to calibrate thresholds on: accuracy/F1 not computed")
    elif metric_set.needs_calibration:
        calibration_pairs = _load_other_split(dataset, metric_set.calibration_split, metric_set.calibration_limit, "metric.calibration_split")
        if calibration_pairs.split == split:
            notes.append(f"thresholds fit on the evaluated split itself ({split}): in-sample accuracy/F1")
        calibration = score_pairs(calibration_pairs, encoder, pooler, layer, postprocessor)[0]
    elif any(m.calibrated for m in metric_set.metrics):
        notes.append("no metric.calibration_split: accuracy/F1 need a train-calibrated threshold and were not computed")

    started = time.perf_counter()
    scores, embedding = score_pairs(pairs, encoder, pooler, layer, postprocessor)
    total_seconds = time.perf_counter() - started
    vectors = SentenceVectors(embedding.sentences, embedding.compared) if metric_set.needs_vectors else None
    metrics = metric_set.compute(scores, calibration, int(cfg.seed), vectors)
    k = int((cfg.get("error_analysis") or {}).get("k", 20))

    if isinstance(encoder, CachedEncoder):
        embedding.encoder_counts.update(encoder.stats)
    tokens = embedding.encoder_counts.get("tokens", 0)
    # Cost of producing the scores, whether the states were computed now or read from the cache
    # (then: what computing them cost), so jobs compare like with like; the read is logged apart.
    producing = total_seconds - embedding.waited_seconds + embedding.encode_seconds
    timings = {
        "encode_seconds": embedding.encode_seconds,
        "cache_read_seconds": embedding.read_seconds,
        "pool_seconds": embedding.pool_seconds,
        "pairs_per_second": len(pairs) / producing if producing > 0 else float("inf"),
        "tokens_per_second": tokens / embedding.encode_seconds if embedding.encode_seconds else float("inf"),
    }
    return Evaluation(layer, scores, metrics, embedding.encoder_counts, timings,
                      calibration.pairs if calibration else None, training_curve, learned, notes,
                      mistakes=confident_mistakes(scores, k), states=embedding.origin)


@functools.lru_cache(maxsize=2)
def _encoder_by_config(registry: Registry, config_yaml: str):
    return registry.build("encoder", OmegaConf.create(config_yaml))


def shared_encoder(registry: Registry, config: DictConfig):
    """One encoder object per encoder config in this process: the jobs of a sweep share its weights."""
    return _encoder_by_config(registry, OmegaConf.to_yaml(config, resolve=True))


@functools.lru_cache(maxsize=4)
def token_state_cache(folder: str | None, max_gb: float) -> TokenStateCache:
    """The process's token-state cache for ``folder`` (memory + disk)."""
    return TokenStateCache(folder, max_gb)


def _load_other_split(dataset, split: str, limit: int | None, option: str) -> PairSet:
    if split not in dataset.splits:
        raise LayerprobeError(f"{option}={split}: this dataset has no such split (it has: {', '.join(dataset.splits)})")
    pairs = dataset.load(split, limit)
    if not len(pairs):
        raise LayerprobeError(f"{option}={split}: no labelled pair in that split ({pairs.rows_read} rows read)")
    return pairs


def score_pairs(pairs: PairSet, encoder, pooler, layer: Layer, postprocessor=None) -> tuple[PairScores, Embedding]:
    """Cosine similarity of every pair; each distinct sentence is encoded once.

    The post-processor (already fit on the train split) transforms both sentences' vectors.
    """
    sentences, a_index, b_index = pairs.unique_sentences()
    embedding = embed(sentences, encoder, pooler, layer)
    embedding.sentences = sentences
    embedding.compared = postprocessor.transform(embedding.vectors) if postprocessor is not None else embedding.vectors
    vectors = embedding.compared.double()
    scores = torch.nn.functional.cosine_similarity(vectors[a_index], vectors[b_index], dim=1)
    return PairScores(pairs, scores.numpy()), embedding


def confident_mistakes(scores: PairScores, k: int) -> list[dict[str, Any]]:
    """The ``k`` most confident mistakes of each kind (the paper's error analysis).

    Binary labels: the highest-scored non-paraphrases and the lowest-scored paraphrases. Graded
    labels: the largest disagreements between the score's rank and the label's rank (both as
    fractions of the pairs), in either direction.
    """
    from scipy import stats

    pairs, values = scores.pairs, scores.scores
    if k <= 0 or not len(pairs):
        return []
    rows = []

    def row(kind, i, **extra):
        return {"kind": kind, "id": pairs.ids[i], "sentence_a": pairs.sentences_a[i], "sentence_b": pairs.sentences_b[i],
                "label": float(pairs.labels[i]), "score": float(values[i]), **extra}

    if pairs.label_kind == "binary":
        negatives = np.flatnonzero(pairs.labels <= 0.5)
        positives = np.flatnonzero(pairs.labels > 0.5)
        rows += [row("high-scored non-paraphrase", i) for i in negatives[np.argsort(-values[negatives], kind="stable")][:k]]
        rows += [row("low-scored paraphrase", i) for i in positives[np.argsort(values[positives], kind="stable")][:k]]
    else:
        n = len(pairs)
        score_rank = stats.rankdata(values) / n
        label_rank = stats.rankdata(pairs.labels) / n
        gap = score_rank - label_rank
        rows += [row("scored above its label", i, score_rank=float(score_rank[i]), label_rank=float(label_rank[i]))
                 for i in np.argsort(-gap, kind="stable")[:k] if gap[i] > 0]
        rows += [row("scored below its label", i, score_rank=float(score_rank[i]), label_rank=float(label_rank[i]))
                 for i in np.argsort(gap, kind="stable")[:k] if gap[i] < 0]
    return rows


def embed(sentences: Sequence[str], encoder, pooler, layer: Layer) -> Embedding:
    """Encode and pool ``sentences`` batch by batch; vectors come back in the sentences' order."""
    vectors: torch.Tensor | None = None
    filled = torch.zeros(len(sentences), dtype=torch.bool)
    counts: Counter = Counter()
    encode_seconds = pool_seconds = 0.0
    for batch, spent in timed(encoder.encode(sentences, layer)):
        encode_seconds += spent
        if batch is None:
            break
        started = time.perf_counter()
        pooled = pooler.pool(batch).float().cpu()
        index = batch.sentence_index.cpu()
        if vectors is None:
            vectors = torch.zeros(len(sentences), pooled.shape[1])
        vectors[index] = pooled
        filled[index] = True
        counts.update(batch.counts)
        pool_seconds += time.perf_counter() - started
    if vectors is None or not bool(filled.all()):
        missing = len(sentences) if vectors is None else int((~filled).sum())
        raise RuntimeError(f"the encoder returned no states for {missing} of {len(sentences)} sentences")
    embedding = Embedding(vectors, counts, encode_seconds, pool_seconds, waited_seconds=encode_seconds)
    last = getattr(encoder, "last", None) or {}
    if last.get("origin") == "cache":
        embedding.origin, embedding.read_seconds = "cache", encode_seconds
        if last.get("encode_seconds") is not None:  # the computing run's cost, stored with the states
            embedding.encode_seconds = float(last["encode_seconds"])
        else:
            embedding.origin = "cache (cost not recorded)"
    elif last.get("origin") in ("computed", "continued"):  # the computation alone, not the cache write
        embedding.origin, embedding.encode_seconds = last["origin"], float(last["encode_seconds"])
    return embedding


def token_states_of(pairs: PairSet, encoder, layer: Layer) -> PairTokenStates:
    """All token states of a split's distinct sentences (on CPU), for a pooler's ``fit``."""
    sentences, a_index, b_index = pairs.unique_sentences()
    batches = [
        TokenStates(b.states.float().cpu(), b.mask.cpu(), b.sentence_index.cpu(), b.counts)
        for b in encoder.encode(sentences, layer)
    ]
    return PairTokenStates(batches, a_index, b_index, np.asarray(pairs.labels))


def result_line(cfg: DictConfig, evaluation: Evaluation) -> str:
    """The one line a job prints, e.g. ``glove mean mrpc/validation layer=- spearman=0.3794 [...] n=408 skipped=0``."""
    pairs = evaluation.pairs
    parts = [str(cfg.encoder.name), str(cfg.pooler.name), f"{pairs.dataset}/{pairs.split}", f"layer={evaluation.layer.label}"]
    if cfg.get("postprocess") and cfg.postprocess.name != "none":
        parts.insert(2, f"+{cfg.postprocess.name}")
    headline = evaluation.metric("spearman") or (evaluation.metrics[0] if evaluation.metrics else None)
    if headline is not None:
        text = f"{headline.name}={headline.value:.4f}"
        if headline.ci_low is not None:
            text += f" [{headline.ci_low:.4f}, {headline.ci_high:.4f}]"
        parts.append(text)
    parts += [f"n={len(pairs)}", f"skipped={pairs.rows_skipped}"]
    return " ".join(parts)
