"""One evaluation, in one direction: dataset → encoder → pooler → post-process → cosine → metrics.

``plan`` builds every stage and checks every option once, before any work (and, in a job, before
any tracked run exists); ``run_plan`` is the chain of stages. Tracking is not done here:
``evaluate`` returns an ``Evaluation``; ``framework.job`` hands it to the configured trackers.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from framework.cache import CachedEncoder, TokenStateCache, timed
from framework.contracts import Evaluation, TuneReport, Tuned
from framework.data import Layer, MetricValue, PairScores, PairSet, PairTokenStates, SentenceVectors, TokenStates
from framework.errors import LayerprobeError
from framework.metricset import MetricSet
from framework.phases import CLOCK
from framework.plugins import Registry
from framework.stages import LearnedPooler, TrainableEncoder, TunableEncoder, cache_token_states, learned_tensors, needs_fit

if TYPE_CHECKING:
    import torch

POOLED, FITTED = "pooled-", "fitted-"  # cache entry kinds beside token states
SCORE_CHUNK = 32768  # pairs scored at once


@dataclass
class Embedding:
    """Pooled vectors of a list of sentences, and what it cost to make them.

    ``compared`` are the vectors the cosine compares (after any post-processing).
    """

    vectors: "torch.Tensor"
    encoder_counts: Counter
    encode_seconds: float
    pool_seconds: float
    sentences: list[str] = field(default_factory=list)
    compared: "torch.Tensor | None" = None
    origin: str = "computed"  # where the token states came from: computed | cache | continued
    read_seconds: float = 0.0  # time spent reading them from the cache
    waited_seconds: float = 0.0  # wall time of the encoder calls (computing, or reading the cache)
    replayed_seconds: float = 0.0  # production cost not spent now (pooling of vectors read from the cache)


@dataclass
class Split:
    """Which split a stage reads, and how many of its rows."""

    name: str
    limit: int | None
    option: str  # the option that chose it, for error messages


@dataclass
class JobPlan:
    """A job's stages, built, with their options checked: what ``run_plan`` runs."""

    dataset: Any
    encoder: Any
    pooler: Any
    postprocessor: Any | None  # None: nothing to fit or apply
    metric_set: MetricSet
    layer: Layer
    split: Split
    seed: int
    mistakes: int
    pooler_train: Split | None  # a pooler that learns: its train split
    postprocess_train: Split | None
    postprocess_name: str = "none"
    pooler_identity: str | None = None  # what the pooled-vector cache keys on; None: do not cache vectors
    cache: TokenStateCache | None = None
    finetune: "FinetunePlan | None" = None  # None: the encoder's model as published


@dataclass
class FinetunePlan:
    """How a job's encoder is fine-tuned before it encodes: the finetuner, its train split, and how
    to rebuild the encoder on the tuned weights."""

    finetuner: Any
    split: Split
    root: Path  # tuned models live in <root>/<fingerprint>/
    identity: str  # the finetune options that change the weights (a part of the fingerprint)
    registry: Registry
    encoder_config: DictConfig
    base: Any  # the encoder on the published weights (a TunableEncoder)


def evaluate(cfg: DictConfig, registry: Registry, components: dict[str, Any] | None = None) -> Evaluation:
    """Run the job that ``cfg`` describes. Bad input raises ``LayerprobeError`` before any work.

    ``components`` may hold objects already built (``dataset``, ``encoder``, ``pooler``): the Python
    API passes a model or pairs held in memory this way; the rest is built from ``cfg``.
    """
    return run_plan(plan(cfg, registry, components))


@contextlib.contextmanager
def from_settings(*settings: str):
    """Mark a ``LayerprobeError`` raised inside with the config settings it comes from (the
    innermost mark wins): a sweep that does not vary them stops at its first job."""
    try:
        yield
    except LayerprobeError as error:
        if error.settings is None:
            error.settings = settings
        raise


def plan(cfg: DictConfig, registry: Registry, components: dict[str, Any] | None = None) -> JobPlan:
    """Every stage built and every option read from ``cfg`` once; one-line errors for bad ones."""
    with from_settings("dataset", "data_root"):
        dataset = (components or {}).get("dataset") or registry.build("dataset", cfg.dataset)
    with from_settings("encoder"):
        encoder = (components or {}).get("encoder") or shared_encoder(registry, cfg.encoder)
        encoder.fingerprint()  # loads the model or vectors: a missing file or model is the encoder's error
    with from_settings("encoder", "layer"):
        layer = encoder.resolve_layer(cfg.get("layer"))
    with from_settings("finetune", "encoder", "dataset", "data_root"):
        finetune = plan_finetune(cfg, registry, dataset, encoder, "encoder" in (components or {}))
    with from_settings("pooler", "postprocess", "metric", "dataset", "data_root", "seed"):
        job = _plan_stages(cfg, registry, components or {}, dataset, encoder, layer)
    job.finetune = finetune
    return job


def plan_finetune(cfg: DictConfig, registry: Registry, dataset, encoder, given: bool) -> FinetunePlan | None:
    """The fine-tuning stage, checked: a finetuner, an encoder it can train, a train split that
    exists and is not the evaluated one. None for ``finetune=none``."""
    options = cfg.get("finetune")
    if not options:
        return None
    finetuner = registry.build("finetuner", options)
    if not getattr(finetuner, "needs_tuning", True):
        return None
    if given or not isinstance(encoder, TunableEncoder):
        what = "an encoder given as an object" if given else f"encoder={cfg.encoder.get('name')}"
        raise LayerprobeError(f"finetune={options.name} cannot train {what}: it tunes encoders with trainable weights "
                              "(encoder=hf, minilm, sentence_transformers, minilm_st, rwkv)")
    check_module = getattr(finetuner, "check_module", None)
    if callable(check_module):
        check_module(isinstance(encoder, TrainableEncoder))
    split = Split(options.get("train_split", "train"), options.get("train_limit"), "finetune.train_split")
    evaluated = cfg.dataset.get("split", "validation")
    if split.name == evaluated:
        raise LayerprobeError(f"finetune.train_split={split.name} is the evaluated split; fine-tune on another "
                              "(e.g. finetune.train_split=train)")
    _check_split(dataset, split)
    if split.limit is not None and (isinstance(split.limit, bool) or not isinstance(split.limit, int) or split.limit < 1):
        raise LayerprobeError(f"finetune.train_limit={split.limit} must be a positive number of pairs (or null for all)")
    if getattr(dataset, "label_kind", None) in ("binary", "graded"):  # a loss that does not fit the labels: said now
        finetuner.check(dataset.label_kind)
    weights = {key: value for key, value in OmegaConf.to_container(options, resolve=True).items() if key != "dir"}
    root = Path(str(options.get("dir") or "layerprobe-outputs/finetuned")).expanduser()
    return FinetunePlan(finetuner, split, root, json.dumps(weights, sort_keys=True), registry, cfg.encoder, encoder)


def _plan_stages(cfg: DictConfig, registry: Registry, components: dict[str, Any], dataset, encoder, layer: Layer) -> JobPlan:
    cache = None
    if cfg.get("cache") and cfg.cache.get("enabled", True) and cache_token_states(encoder):
        cache = token_state_cache(cfg.cache.get("dir"), float(cfg.cache.get("max_gb", 8)))
        encoder = CachedEncoder(encoder, cache)
    with from_settings("pooler"):
        pooler = components.get("pooler") or registry.build("pooler", cfg.pooler)
    # Vectors of a pooler given as an object are not cached: nothing says what it computes.
    pooler_identity = None if "pooler" in components else OmegaConf.to_yaml(cfg.pooler, resolve=True)
    with from_settings("postprocess"):
        postprocessor = registry.build("postprocessor", cfg.postprocess) if cfg.get("postprocess") else None
    with from_settings("metric"):
        metric_set = MetricSet.from_config(cfg.metric, registry)
    split = Split(cfg.dataset.get("split", "validation"), cfg.dataset.get("limit"), "dataset.split")
    if not split.name:
        raise LayerprobeError("dataset.split is not set; e.g. dataset.split=validation")
    _check_split(dataset, split)  # before any run exists: a bad split leaves no FAILED run behind
    if split.limit is not None and (isinstance(split.limit, bool) or not isinstance(split.limit, int) or split.limit < 1):
        raise LayerprobeError(f"dataset.limit={split.limit} must be a positive number of rows (or null for all)")
    pooler_train = None
    if isinstance(pooler, LearnedPooler):
        pooler_train = Split(cfg.pooler.get("train_split", "train"), cfg.pooler.get("train_limit"), "pooler.train_split")
        _check_split(dataset, pooler_train)
    postprocess_train = None
    if postprocessor is not None and needs_fit(postprocessor):
        postprocess_train = Split(cfg.postprocess.get("train_split", "train"), cfg.postprocess.get("train_limit"),
                                  "postprocess.train_split")
        if postprocess_train.name == split.name:
            raise LayerprobeError(f"postprocess.train_split={split.name} is the evaluated split; post-processing must be fit on "
                                  "another (e.g. postprocess.train_split=train)")
        _check_split(dataset, postprocess_train)
    else:
        postprocessor = None
    return JobPlan(dataset, encoder, pooler, postprocessor, metric_set, layer, split, int(cfg.seed),
                   int((cfg.get("error_analysis") or {}).get("k", 20)), pooler_train, postprocess_train,
                   str(cfg.postprocess.name) if cfg.get("postprocess") else "none", pooler_identity, cache)


def run_plan(job: JobPlan) -> Evaluation:
    """The chain of stages: pairs → fit what learns → calibrate → score → metrics."""
    import torch

    torch.manual_seed(job.seed)
    tuned = tune_encoder(job) if job.finetune is not None else None
    with CLOCK.measure("data"):
        pairs = job.dataset.load(job.split.name, job.split.limit)
    if not len(pairs):
        raise LayerprobeError(f"{pairs.dataset}/{job.split.name} has no labelled pair to evaluate ({pairs.rows_read} rows read, "
                              f"skipped: {dict(pairs.skipped)})")
    metric_set, notes = job.metric_set.for_labels(pairs.label_kind)
    fitted = fit_pooler(job)
    postprocessor, postprocess_learned, fit_costs = fit_postprocessor(job, notes)
    calibration, calibration_seconds = calibrate(job, metric_set, pairs, postprocessor, notes)

    started = time.perf_counter()
    scores, embedding = score_pairs(pairs, job.encoder, job.pooler, job.layer, postprocessor, job.pooler_identity)
    total_seconds = time.perf_counter() - started
    with CLOCK.measure("metrics"):
        vectors = SentenceVectors(embedding.sentences, embedding.compared) if metric_set.needs_vectors else None
        metrics = metric_set.compute(scores, calibration, job.seed, vectors)
        if pairs.evaluator is not None:  # the split's own library scores the same vectors (dataset=mteb)
            compared = vectors or SentenceVectors(embedding.sentences, embedding.compared)
            metrics.extend(MetricValue(name, value) for name, value in pairs.evaluator(compared).items())
        mistakes = confident_mistakes(scores, job.mistakes)
    undefined = [m.name for m in metrics if not np.isfinite(m.value)]
    if undefined:  # said in the run's notes and on stderr, never logged silently (and with no CI beside it)
        note = (f"{', '.join(undefined)} undefined (NaN) on these {len(pairs)} pairs: constant or non-finite scores or "
                "labels (e.g. a layer whose vectors are all alike, or sentences with no known token)")
        notes.append(note)
        print(f"layerprobe: warning: {note}", file=sys.stderr, flush=True)

    if isinstance(job.encoder, CachedEncoder):
        embedding.encoder_counts.update(job.encoder.stats)
        if job.encoder.cache.unwritable is not None:  # the result stands; later runs will recompute what was not kept
            notes.append(f"the cache folder took no writes ({job.encoder.cache.unwritable}): states cached in memory only")
    tokens = embedding.encoder_counts.get("tokens", 0)
    # Cost of producing the scores, whether the states were computed now or read from the cache
    # (then: what computing them cost), so jobs compare like with like; the read is logged apart.
    producing = total_seconds - embedding.waited_seconds + embedding.encode_seconds + embedding.replayed_seconds
    timings = {
        "encode_seconds": embedding.encode_seconds,
        "cache_read_seconds": embedding.read_seconds,
        "pool_seconds": embedding.pool_seconds,
        "pairs_per_second": len(pairs) / producing if producing > 0 else float("inf"),
        "tokens_per_second": tokens / embedding.encode_seconds if embedding.encode_seconds else float("inf"),
    }
    if calibration is not None:  # producing the calibration split's states: work the evaluated split did not need
        timings["calibration_encode_seconds"] = calibration_seconds
    if tuned is not None:  # the training's own time (stored with the weights when they came from the store)
        timings["finetune_seconds"] = tuned.seconds
        notes.extend(tuned.report.notes)
        notes.append(f"finetune: {tuned.report.loss} on {tuned.report.train_pairs} {job.finetune.split.name} pairs, "
                     f"{'trained now' if tuned.origin == 'computed' else 'weights from the store'} ({tuned.folder})")
    if fitted.fit_seconds is not None or fit_costs:
        timings["fit_seconds"] = (fitted.fit_seconds or 0.0) + fit_costs.get("fit_seconds", 0.0)
        timings["fit_encode_seconds"] = fitted.encode_seconds + fit_costs.get("encode_seconds", 0.0)
    return Evaluation(job.layer, scores, metrics, embedding.encoder_counts, timings,
                      calibration.pairs if calibration else None, fitted.curve, {**fitted.learned, **postprocess_learned}, notes,
                      mistakes=mistakes, states=embedding.origin, fit=fitted.origin or ("computed" if fit_costs else ""),
                      tuned=tuned)


TUNED_MANIFEST = "layerprobe-finetune.json"  # written last: a folder without it (or with other checksums) is not used


def tune_encoder(job: JobPlan) -> Tuned:
    """Fine-tune the encoder's model once per fingerprint (base weights, options, seed, training
    pairs), or find it stored; then the job's encoder is the same encoder on the tuned weights.

    A file lock makes concurrent jobs (joblib, submitit, Ray workers; later sweeps) wait for the one
    that trains instead of training again. A stored model is checked file by file against the
    checksums its manifest holds; one that does not match is said, removed and trained again.
    """
    from filelock import FileLock

    plan = job.finetune
    with CLOCK.measure("data"):
        train = _load_split(job.dataset, plan.split)
    plan.finetuner.check(train.label_kind)
    base = plan.base.fingerprint()
    fingerprint = hashlib.sha256(f"{base}|{plan.identity}|seed={job.seed}|{train.revision}".encode()).hexdigest()[:16]
    folder = plan.root / fingerprint
    try:
        plan.root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LayerprobeError(f"finetune.dir={plan.root}: cannot create it ({error.strerror or error}); set finetune.dir "
                              "to a writable folder") from None
    with FileLock(str(folder) + ".lock"):
        stored = _stored_tuning(folder)
        if stored is not None:
            tuned = Tuned(fingerprint, str(folder), "cache", float(stored["seconds"]), TuneReport(**stored["report"]),
                          stored.get("settings", {}))
        else:
            tuned = _train(job, train, base, fingerprint, folder)
    on_tuned = {plan.base.model_option: str(folder), **({"revision": None} if "revision" in plan.encoder_config else {})}
    encoder = shared_encoder(plan.registry, OmegaConf.merge(plan.encoder_config, on_tuned))
    job.encoder = CachedEncoder(encoder, job.cache) if job.cache is not None else encoder
    return tuned


def _train(job: JobPlan, train: PairSet, base: str, fingerprint: str, folder: Path) -> Tuned:
    import shutil
    import tempfile

    plan = job.finetune
    model, revision = plan.base.tunable_model()
    print(f"finetune: training {model} on {len(train)} {train.dataset}/{train.split} pairs (fingerprint {fingerprint})",
          file=sys.stderr, flush=True)
    shutil.rmtree(folder, ignore_errors=True)  # a damaged or half-written earlier attempt
    staging = Path(tempfile.mkdtemp(dir=plan.root, prefix=f".{fingerprint}-"))
    try:
        started = time.perf_counter()
        with CLOCK.measure("finetune"):
            source = plan.base.training_module() if isinstance(plan.base, TrainableEncoder) else model
            report = plan.finetuner.tune(source, revision, train, job.seed, staging / "model")
        seconds = time.perf_counter() - started
        made = staging / "model"
        settings = {"base_model": model, "base_revision": revision, "base_fingerprint": base,
                    "train_split": train.split, "train_revision": train.revision, "seed": job.seed,
                    "options": json.loads(plan.identity)}
        manifest = {"fingerprint": fingerprint, "seconds": seconds, "report": asdict(report), "settings": settings,
                    "files": {str(p.relative_to(made)): _file_digest(p) for p in sorted(made.rglob("*")) if p.is_file()}}
        (made / TUNED_MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        made.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Tuned(fingerprint, str(folder), "computed", seconds, report, settings)


_VERIFIED: dict[str, tuple] = {}  # tuned folders this process checked, with the files' (size, mtime) then


def _stored_tuning(folder: Path) -> dict | None:
    """The manifest of a stored tuned model whose every file matches its checksum, else None
    (a damaged one is said on stderr and trained again, never evaluated). A folder this process
    already checked is read again only if a file's size or modification time changed since."""
    path = folder / TUNED_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        TuneReport(**manifest["report"])
        stamp = tuple((name, *_size_and_mtime(folder / name)) for name in sorted(files)) + (_size_and_mtime(path),)
        damaged = [] if _VERIFIED.get(str(folder)) == stamp else \
            [name for name, digest in files.items() if not (folder / name).is_file() or _file_digest(folder / name) != digest]
    except (OSError, ValueError, KeyError, TypeError) as error:
        damaged = [f"{TUNED_MANIFEST} ({error})"]
    if damaged:
        _VERIFIED.pop(str(folder), None)
        print(f"layerprobe: warning: the stored fine-tuned model {folder} is damaged ({', '.join(damaged[:3])}); "
              "training it again", file=sys.stderr, flush=True)
        return None
    _VERIFIED[str(folder)] = stamp
    return manifest


def _size_and_mtime(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Fitted:
    """What fitting the pooler produced (nothing for poolers that learn nothing)."""

    curve: dict[str, list[float]] = field(default_factory=dict)
    learned: dict[str, Any] = field(default_factory=dict)
    fit_seconds: float | None = None  # the fit's own time (or, restored from the cache, the time it took)
    encode_seconds: float = 0.0  # producing the train split's token states for it
    origin: str = ""  # computed | cache


def fit_pooler(job: JobPlan) -> Fitted:
    """Fit a pooler that learns on its train split, or restore the same fit from the cache.

    A fit is keyed by the encoder, layer, pooler options, seed and the train pairs; a pooler that
    can ``restore`` what it learned skips fitting when the key is cached (a sweep over post-processors
    or a sweep run again fits once).
    """
    if job.pooler_train is None:
        return Fitted()
    train = _load_split(job.dataset, job.pooler_train)
    key = _fit_key(job, train)
    restore = getattr(job.pooler, "restore", None)
    if key is not None and callable(restore):
        stored = job.encoder.entry(key, FITTED)
        if stored is not None:
            restore(stored["learned"])
            job.pooler_identity = _learned_identity(job, stored["learned"])
            return Fitted(stored["curve"], learned_tensors(job.pooler), float(stored["fit_seconds"]),
                          float(stored["encode_seconds"]), "cache")
    states, encode_seconds = token_states_of(train, job.encoder, job.layer)
    started = time.perf_counter()
    with CLOCK.measure("fit"):
        curve = job.pooler.fit(states, job.seed) or {}
    fit_seconds = time.perf_counter() - started
    learned = learned_tensors(job.pooler)
    if job.pooler_identity is not None:
        job.pooler_identity = _learned_identity(job, learned)
    if key is not None and callable(restore):
        job.cache.put_entry(key, FITTED, {"learned": learned, "curve": curve, "fit_seconds": fit_seconds,
                                          "encode_seconds": encode_seconds})
    return Fitted(curve, learned, fit_seconds, encode_seconds, "computed")


def _fit_key(job: JobPlan, train: PairSet) -> str | None:
    if job.cache is None or job.cache.folder is None or job.pooler_identity is None:
        return None
    sentences, a_index, b_index = train.unique_sentences()
    digest = hashlib.sha256(f"{job.pooler_identity}|seed={job.seed}".encode())
    for array in (a_index, b_index, np.asarray(train.labels, dtype=np.float64)):
        digest.update(np.ascontiguousarray(array).tobytes())
    return job.cache.key(f"{job.encoder.fingerprint()}|fit|{digest.hexdigest()}", job.layer.index, sentences)


def _learned_identity(job: JobPlan, learned: dict[str, Any]) -> str:
    """A learned pooler's vectors depend on what it learned: its identity includes a hash of it."""
    digest = hashlib.sha256()
    for name, value in sorted(_flat_tensors(learned).items()):
        digest.update(name.encode() + value.detach().cpu().contiguous().numpy().tobytes())
    return f"{job.pooler_identity}|learned={digest.hexdigest()[:16]}"


def _flat_tensors(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat_tensors(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def fit_postprocessor(job: JobPlan, notes: list[str]):
    """Fit the post-processor on the pooled vectors of its train split's sentences (both sides)."""
    if job.postprocessor is None:
        return None, {}, {}
    import torch

    fit_pairs = _load_split(job.dataset, job.postprocess_train)
    # Statistics of the sentences as the pairs hold them (both sides, repeats kept, as in
    # BERT-whitening); each distinct sentence is still encoded once.
    fit_sentences, fit_a, fit_b = fit_pairs.unique_sentences()
    embedding = embed(fit_sentences, job.encoder, job.pooler, job.layer, job.pooler_identity)
    started = time.perf_counter()
    with CLOCK.measure("postprocess_fit"):
        fitted = job.postprocessor.fit(torch.cat([embedding.vectors[fit_a], embedding.vectors[fit_b]]), job.seed) or {}
    notes.append(f"postprocess={job.postprocess_name} fit on the {2 * len(fit_pairs)} sentences of "
                 f"{len(fit_pairs)} {fit_pairs.dataset}/{job.postprocess_train.name} pairs")
    costs = {"fit_seconds": time.perf_counter() - started, "encode_seconds": embedding.encode_seconds}
    return job.postprocessor, ({f"postprocess_{job.postprocess_name}": fitted} if fitted else {}), costs


def calibrate(job: JobPlan, metric_set: MetricSet, pairs: PairSet, postprocessor, notes: list[str]):
    """Scores of the calibration split, for the thresholds of accuracy/F1 (None when not needed),
    and what producing its states cost."""
    if metric_set.needs_calibration and metric_set.calibration_split not in job.dataset.splits:
        notes.append(f"no {metric_set.calibration_split} split to calibrate thresholds on: accuracy/F1 not computed")
        return None, 0.0
    if metric_set.needs_calibration:
        calibration_pairs = _load_split(job.dataset, Split(metric_set.calibration_split, metric_set.calibration_limit,
                                                           "metric.calibration_split"))
        if calibration_pairs.split == job.split.name:
            notes.append(f"thresholds fit on the evaluated split itself ({job.split.name}): in-sample accuracy/F1")
        scores, embedding = score_pairs(calibration_pairs, job.encoder, job.pooler, job.layer, postprocessor, job.pooler_identity)
        return scores, embedding.encode_seconds
    if any(m.calibrated for m in metric_set.metrics):
        notes.append("no metric.calibration_split: accuracy/F1 need a train-calibrated threshold and were not computed")
    return None, 0.0


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


def _check_split(dataset, split: Split) -> None:
    if split.name not in dataset.splits:
        raise LayerprobeError(f"{split.option}={split.name}: this dataset has no such split (it has: {', '.join(dataset.splits)})")


def _load_split(dataset, split: Split) -> PairSet:
    _check_split(dataset, split)
    with CLOCK.measure("data"):
        pairs = dataset.load(split.name, split.limit)
    if not len(pairs):
        raise LayerprobeError(f"{split.option}={split.name}: no labelled pair in that split ({pairs.rows_read} rows read)")
    return pairs


def score_pairs(pairs: PairSet, encoder, pooler, layer: Layer, postprocessor=None,
                pooler_identity: str | None = None) -> tuple[PairScores, Embedding]:
    """Cosine similarity of every pair; each distinct sentence is encoded once.

    The post-processor (already fit on the train split) transforms both sentences' vectors.
    """
    import torch

    sentences, a_index, b_index = pairs.unique_sentences()
    embedding = embed(sentences, encoder, pooler, layer, pooler_identity)
    embedding.sentences = sentences
    embedding.compared = postprocessor.transform(embedding.vectors) if postprocessor is not None else embedding.vectors
    vectors = embedding.compared.double()
    scores = np.empty(len(a_index), dtype=np.float64)
    for start in range(0, len(a_index), SCORE_CHUNK):  # row by row the same numbers, without 2 × pairs × dim copies
        rows = slice(start, start + SCORE_CHUNK)
        scores[rows] = torch.nn.functional.cosine_similarity(vectors[a_index[rows]], vectors[b_index[rows]], dim=1).numpy()
    return PairScores(pairs, scores), embedding


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


def embed(sentences: Sequence[str], encoder, pooler, layer: Layer, pooler_identity: str | None = None) -> Embedding:
    """Encode and pool ``sentences`` batch by batch; vectors come back in the sentences' order.

    With a token cache and a pooler whose identity is known, the pooled vectors themselves are
    cached too (far smaller than token states): a later job with the same encoder, layer, pooler
    and sentences reads them instead of encoding.
    """
    cache = encoder.cache if isinstance(encoder, CachedEncoder) else None
    key = None
    if cache is not None and cache.folder is not None and pooler_identity is not None:
        started = time.perf_counter()
        key = cache.key(f"{encoder.fingerprint()}|pooled|{pooler_identity}", layer.index, sentences)
        stored = encoder.entry(key, POOLED)
        if stored is not None:  # its checksum was verified on read
            read = time.perf_counter() - started
            encoder.stats["cache_hits"] += 1
            encoder.stats["cache_hits_pooled"] += 1
            CLOCK.add("cache_read", read)
            return Embedding(stored["vectors"], Counter(stored["counts"]), float(stored["encode_seconds"]), float(stored["pool_seconds"]),
                             origin="cache", read_seconds=read, waited_seconds=read, replayed_seconds=float(stored["pool_seconds"]))
    embedding = _encode_and_pool(sentences, encoder, pooler, layer)
    if key is not None:
        cache.put_entry(key, POOLED, {"vectors": embedding.vectors, "counts": dict(embedding.encoder_counts),
                                      "encode_seconds": embedding.encode_seconds, "pool_seconds": embedding.pool_seconds})
    return embedding


def _encode_and_pool(sentences: Sequence[str], encoder, pooler, layer: Layer) -> Embedding:
    import torch

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
    CLOCK.add("encode", encode_seconds)
    CLOCK.add("pool", pool_seconds)
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


def token_states_of(pairs: PairSet, encoder, layer: Layer) -> tuple[PairTokenStates, float]:
    """All token states of a split's distinct sentences, for a pooler's ``fit``, and what producing
    them cost. They stay on the device the encoder made them on (a GPU encoder's fit runs there)."""
    sentences, a_index, b_index = pairs.unique_sentences()
    batches, seconds = [], 0.0
    for batch, spent in timed(encoder.encode(sentences, layer)):
        seconds += spent
        if batch is None:
            break
        batches.append(TokenStates(batch.states.float(), batch.mask, batch.sentence_index.cpu(), batch.counts))
    CLOCK.add("encode", seconds)
    last = getattr(encoder, "last", None) or {}
    if last.get("encode_seconds") is not None:
        seconds = float(last["encode_seconds"])  # production cost (for cache hits: the computing run's)
    return PairTokenStates(batches, a_index, b_index, np.asarray(pairs.labels)), seconds


def result_line(cfg: DictConfig, evaluation: Evaluation) -> str:
    """The one line a job prints, e.g. ``glove mean mrpc/validation layer=- spearman=0.3794 [...] n=408 skipped=0``."""
    pairs = evaluation.pairs
    parts = [str(cfg.encoder.name), str(cfg.pooler.name), f"{pairs.dataset}/{pairs.split}", f"layer={evaluation.layer.label}"]
    if cfg.get("postprocess") and cfg.postprocess.name != "none":
        parts.insert(2, f"+{cfg.postprocess.name}")
    if evaluation.tuned is not None:
        parts.insert(2, f"ft:{evaluation.tuned.report.loss}")
    headline = evaluation.metric("spearman") or (evaluation.metrics[0] if evaluation.metrics else None)
    if headline is not None:
        text = f"{headline.name}={headline.value:.4f}"
        if headline.ci_low is not None:
            text += f" [{headline.ci_low:.4f}, {headline.ci_high:.4f}]"
        parts.append(text)
    parts += [f"n={len(pairs)}", f"skipped={pairs.rows_skipped}"]
    return " ".join(parts)
