"""What the harness expects of the objects that plugin factories return.

Required members are plain protocol members; optional ones are declared in their own protocols
(checked with ``isinstance``) or as attributes with a documented default, read with ``getattr``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence, runtime_checkable

from framework.contracts import Evaluation, JobInfo, SweepInfo, TuneReport
from framework.data import Layer, PairSet, PairTokenStates, TokenStates
from framework.results import JobResult

if TYPE_CHECKING:
    import torch


class Dataset(Protocol):
    splits: tuple[str, ...]
    # Optional: "binary" or "graded" when the labels' kind is known without reading a split (GLUE
    # tasks; dataset=pairs with dataset.label_kind set), so label checks run before any run exists.
    label_kind: str | None

    def load(self, split: str, limit: int | None) -> PairSet:
        """The split's pairs (the first ``limit`` rows if given); bad rows counted, not dropped silently.

        ``split`` and ``limit`` come from the harness-owned options ``dataset.split``/``dataset.limit``.
        """


class Encoder(Protocol):
    # Optional: False for encoders whose states are cheaper to recompute than to read from disk.
    cache_token_states: bool

    def resolve_layer(self, layer: int | None) -> Layer:
        """Check the requested layer (one-line error giving the valid range) and resolve it."""

    def fingerprint(self) -> str:
        """A short hash of everything that changes the output: weights, config, tokenizer."""

    def encode(self, sentences: Sequence[str], layer: Layer) -> Iterator[TokenStates]:
        """Token states of every sentence, in batches; each sentence exactly once."""


@runtime_checkable
class ResumableEncoder(Protocol):
    """Optional: an encoder whose deeper layers can continue from a shallower layer's states."""

    def can_resume_from(self, layer: Layer) -> bool:
        """Whether states at ``layer`` are a valid starting point for deeper layers."""

    def resume(self, batch: TokenStates, sentences: Sequence[str], start: Layer, layer: Layer) -> TokenStates:
        """States at ``layer`` from the cached ``batch`` at the shallower ``start``."""


def cache_token_states(encoder) -> bool:
    return bool(getattr(encoder, "cache_token_states", True))


@runtime_checkable
class TunableEncoder(Protocol):
    """Optional: an encoder whose model a finetuner can train. ``tunable_model()`` says where its
    weights come from (a local folder or hub id, and a revision); ``model_option`` names the option
    that, set to the tuned folder, builds the same encoder on the tuned weights (``model``)."""

    model_option: str

    def tunable_model(self) -> tuple[str, str | None]:
        """(model folder or hub id, revision or None), as ``transformers`` loads it."""


@runtime_checkable
class TrainableEncoder(TunableEncoder, Protocol):
    """Optional: a tunable encoder whose model is not a transformers model (RWKV). Its
    ``training_module()`` is a differentiable module in sentence-transformers' input-module form
    (``preprocess``, ``forward`` → ``token_embeddings``, ``save``) that the finetuner trains instead
    of loading ``tunable_model()``; the folder it saves is what ``model_option`` loads."""

    def training_module(self) -> Any: ...


@runtime_checkable
class Finetuner(Protocol):
    """Trains an encoder's model on the pairs of a train split (``finetune=<name>``).

    ``needs_tuning = False`` for ``finetune=none``. ``check(label_kind)`` raises a one-line
    ``LayerprobeError`` for options that do not fit the labels (e.g. a loss for positive pairs on
    graded scores); ``tune(model, revision, train, seed, out)`` writes the tuned model,
    loadable by ``transformers``/``sentence-transformers``, into the empty folder ``out`` and returns
    a ``TuneReport``; ``model`` is a folder or hub id, or a ``TrainableEncoder``'s training module.
    Optional ``check_module(trainable)`` refuses options that need a transformers model when the
    encoder gives a training module instead (``trainable=True``). The harness stores it by fingerprint and never shows it the evaluated split.
    """

    needs_tuning: bool

    def check(self, label_kind: str) -> None: ...

    def tune(self, model: str, revision: str | None, train: PairSet, seed: int, out: Path) -> TuneReport: ...


class Pooler(Protocol):
    def pool(self, states: TokenStates) -> torch.Tensor:
        """One vector per sentence of the batch, from its real (unmasked) tokens only."""


@runtime_checkable
class LearnedPooler(Pooler, Protocol):
    def fit(self, train: PairTokenStates, seed: int) -> dict[str, list[float]]:
        """Learn from the train split only; returns the training curve to log."""


class PostProcessor(Protocol):
    # Optional: False for a post-processor that learns nothing (``postprocess=none``).
    needs_fit: bool

    def fit(self, train_vectors: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """Learn from the train split's pooled vectors only; returns the fitted statistics to log."""

    def transform(self, vectors: torch.Tensor) -> torch.Tensor:
        """The vectors the similarity compares, from pooled ones (same count; any width)."""


def needs_fit(postprocessor) -> bool:
    return bool(getattr(postprocessor, "needs_fit", True))


def learned_tensors(pooler) -> dict[str, Any]:
    """Optional ``learned()`` of a pooler that learns: what it learned, saved with the run."""
    learned = getattr(pooler, "learned", None)
    return learned() if callable(learned) else {}


class Tracker(Protocol):
    """Where jobs and sweeps are recorded (the built-in is MLflow: ``plugins/mlflow``)."""

    def start_sweep(self, sweep: SweepInfo) -> dict[str, Any]:
        """Called once, in the driver, before any job. Returns JSON-able state that every job's
        process gets back as ``job.sweep.trackers[<tracking name>]`` (e.g. a parent run's id).
        Raises ``LayerprobeError`` if the sweep cannot be recorded: the sweep then does not start."""

    def start_job(self, job: JobInfo) -> None:
        """Before a job's work: record what it was asked to do (so failed jobs carry it too)."""

    def end_job(self, job: JobInfo, result: JobResult, evaluation: Evaluation | None) -> None:
        """After a job, whatever its ``result.status`` (FINISHED, FAILED, KILLED); ``evaluation`` is
        None unless it finished. Sets ``result.run_ref`` to the tracker's id of the record."""

    def end_sweep(self, sweep: SweepInfo, results: list[JobResult], files: dict[str, Path], status: str) -> None:
        """After the last job or on interruption: the summary ``files`` (name → path) and the sweep's
        status (FINISHED, FAILED, KILLED). Jobs still recorded as running are to be ended as KILLED."""


@runtime_checkable
class CheckedTracker(Protocol):
    """Optional: a tracker that can tell, after a failed call, that its store is out of reach."""

    def unavailable(self) -> str | None:
        """Why the store cannot be reached now (e.g. its server stopped answering), or None. A job
        whose record fails this way stops the sweep: every later job would fail the same way."""

    def location(self) -> str:
        """Where the store is (a database file, a server's URI), for errors that name it."""


@runtime_checkable
class ResumingTracker(Protocol):
    """Optional: a tracker that can hand back an earlier finished job, for ``resume=true``."""

    def find_finished(self, config_hash: str) -> JobResult | None:
        """The newest FINISHED job with this config hash, with its per-pair scores, or None."""


@runtime_checkable
class ReplayingTracker(Protocol):
    """Optional: a tracker that can record a result computed earlier, for ``resume=true`` to replay
    what a job computed while the store was out of service (kept in ``<output dir>/unrecorded``)."""

    def record(self, job: JobInfo, result: JobResult, origin: str) -> None:
        """Record ``result`` (FINISHED, with per-pair scores) as the run of ``job``, saying it was
        replayed from ``origin``; into the run that was started for it when that still exists.
        Sets ``result.run_ref``."""


@runtime_checkable
class StaleRecovery(Protocol):
    """Optional: a tracker that recognises records left running by processes that were killed."""

    def recover_stale(self) -> int:
        """End such records as KILLED; returns how many."""


@runtime_checkable
class ReportSource(Protocol):
    """Optional: a tracker that reads its records back for ``python -m framework.report``."""

    def load_results(self, parent: str | None = None) -> list[JobResult]:
        """Every job of the experiment (or of the sweep ``parent``), with its settings and metrics."""


@runtime_checkable
class ScoreSource(Protocol):
    """Optional, with ``ReportSource``: the per-pair scores of a run read back (for paired
    comparisons in reports, e.g. tuned against untuned); None when the run kept none."""

    def scores_of(self, result: JobResult) -> Any: ...
