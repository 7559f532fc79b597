"""``finetune=contrastive``: contrastive fine-tuning with sentence-transformers, before evaluating.

The model is trained as a sentence-transformers model (the transformer, mean pooling over the
attention mask) with one of that library's losses, by its own ``SentenceTransformerTrainer``:

- ``mnrl``: MultipleNegativesRankingLoss on the positive pairs (label 1), in-batch negatives;
  the default for binary labels (paraphrase or not);
- ``cosent`` / ``angle``: CoSENT / AnglE on graded scores (min–max scaled to 0–1, e.g. STS-B / 5);
  CoSENT is the default for graded labels;
- ``adaptive_layer``: AdaptiveLayerLoss around the default loss: every layer is trained to embed
  well, the natural loss for a layer-by-layer study;
- ``matryoshka``: MatryoshkaLoss around the default loss (``matryoshka_dims``).

``method=lora`` trains LoRA adapters (``peft``; ``lora.r``, ``lora.alpha``, ``lora.dropout``) and
merges them into the weights, so the tuned folder is a plain model every encoder loads.
``held_out_fraction`` sets part of the train split aside to score after every epoch (Spearman of
the cosine for graded labels, average precision for binary ones); with ``patience`` training stops
when that score has not improved for so many epochs and the best epoch's weights are kept.
Needs ``pip install 'layerprobe[finetune]'`` (and ``[lora]`` for LoRA).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from framework.contracts import TuneReport
from framework.data import PairSet
from framework.errors import LayerprobeError
from framework.hookspecs import hookimpl

LOSSES = ("mnrl", "cosent", "angle", "adaptive_layer", "matryoshka")
METHODS = ("full", "lora")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class NoOptions:
    """``finetune=none``: the model as published."""


class NoTuning:
    needs_tuning = False

    def check(self, label_kind: str) -> None:
        pass

    def tune(self, model, revision, train, seed, out):  # never called: needs_tuning is False
        raise AssertionError("finetune=none does not tune")


@dataclass
class LoraOptions:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1


@dataclass
class ContrastiveOptions:
    loss: str | None = None  # mnrl | cosent | angle | adaptive_layer | matryoshka; None: mnrl (binary) / cosent (graded)
    epochs: int = 1
    batch_size: int = 16
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_length: int | None = None  # tokens per sentence while training; None: the model's own limit
    held_out_fraction: float = 0.0  # of the train split, scored after every epoch (0: none)
    patience: int | None = None  # epochs without a better held-out score before stopping (needs held_out_fraction)
    matryoshka_dims: list[int] | None = None  # None: the full size, halved down to 32
    method: str = "full"  # full | lora
    lora: LoraOptions = field(default_factory=LoraOptions)
    precision: str = "auto"  # auto (bf16 autocast on a CUDA device that has it, else fp32) | fp32 | bf16


class ContrastiveFinetuner:
    needs_tuning = True

    def __init__(self, options: ContrastiveOptions):
        if options.loss is not None and options.loss not in LOSSES:
            raise LayerprobeError(f"finetune.loss={options.loss}: use one of {', '.join(LOSSES)} (or null: from the labels)")
        if options.method not in METHODS:
            raise LayerprobeError(f"finetune.method={options.method}: use full or lora")
        for name in ("epochs", "batch_size"):
            if getattr(options, name) < 1:
                raise LayerprobeError(f"finetune.{name}={getattr(options, name)} must be at least 1")
        if options.batch_size < 2 and self._base_loss(options.loss, "binary") == "mnrl":
            raise LayerprobeError("finetune.batch_size=1: mnrl needs at least 2 pairs per batch (its negatives are the others)")
        if not options.lr > 0:
            raise LayerprobeError(f"finetune.lr={options.lr} must be positive, e.g. finetune.lr=2e-5")
        if not 0 <= options.warmup_ratio < 1:
            raise LayerprobeError(f"finetune.warmup_ratio={options.warmup_ratio} must be in [0, 1)")
        if not 0 <= options.held_out_fraction < 1:
            raise LayerprobeError(f"finetune.held_out_fraction={options.held_out_fraction} must be in [0, 1), e.g. 0.1")
        if options.patience is not None and (options.patience < 1 or options.held_out_fraction == 0):
            raise LayerprobeError("finetune.patience needs a held-out part to watch: set finetune.held_out_fraction (e.g. 0.1) "
                                  "and a patience of at least 1 epoch")
        if options.precision not in PRECISIONS:
            raise LayerprobeError(f"finetune.precision={options.precision}: use auto, fp32 or bf16")
        if options.method == "lora":
            try:
                import peft  # noqa: F401
            except ImportError:
                raise LayerprobeError("finetune.method=lora needs the peft package: pip install 'layerprobe[lora]'") from None
        self.options = options

    @staticmethod
    def _base_loss(loss: str | None, label_kind: str) -> str:
        if loss in ("mnrl", "cosent", "angle"):
            return loss
        return "mnrl" if label_kind == "binary" else "cosent"

    def loss_name(self, label_kind: str) -> str:
        """The loss as run: ``cosent``, ``adaptive_layer(mnrl)``, …"""
        base = self._base_loss(self.options.loss, label_kind)
        return f"{self.options.loss}({base})" if self.options.loss in ("adaptive_layer", "matryoshka") else base

    def check(self, label_kind: str) -> None:
        if self.options.loss == "mnrl" and label_kind != "binary":
            raise LayerprobeError("finetune.loss=mnrl trains on positive pairs, which graded scores do not mark; "
                                  "use finetune.loss=cosent or angle (or null: cosent for graded labels)")

    def check_module(self, trainable: bool) -> None:
        """A training module (RWKV) is not a transformers model: LoRA and AdaptiveLayerLoss need one."""
        if not trainable:
            return
        if self.options.method == "lora":
            raise LayerprobeError("finetune.method=lora needs a transformers model (peft adapts its linear layers); "
                                  "use finetune.method=full for this encoder")
        if self.options.loss == "adaptive_layer":
            raise LayerprobeError("finetune.loss=adaptive_layer needs a transformers model (it reads every layer's "
                                  "states through it); use cosent, angle, mnrl or matryoshka for this encoder")

    def tune(self, model, revision: str | None, train: PairSet, seed: int, out: Path) -> TuneReport:
        """``model``: a folder or hub id that sentence-transformers loads, or a training module
        (``framework.stages.TrainableEncoder``) to put in front of mean pooling."""
        try:
            from datasets import Dataset
            from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
            from sentence_transformers.training_args import BatchSamplers
            try:
                from sentence_transformers.sentence_transformer import losses
            except ImportError:  # sentence-transformers before 6
                from sentence_transformers import losses
        except ImportError as error:
            raise LayerprobeError(f"finetune=contrastive needs sentence-transformers and accelerate ({error.name} is missing): "
                                  "pip install 'layerprobe[finetune]'") from None
        import torch
        from transformers import TrainerCallback, set_seed

        options = self.options
        self.check(train.label_kind)
        base = self._base_loss(options.loss, train.label_kind)
        set_seed(seed)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(model, str):
            st_model = SentenceTransformer(model, revision=revision, device=device)
        else:
            self.check_module(True)
            st_model = SentenceTransformer(modules=[model, _mean_pooling(model.get_embedding_dimension())], device=device)
        bf16 = options.precision == "bf16" or (options.precision == "auto" and device == "cuda" and torch.cuda.is_bf16_supported())
        if options.precision == "bf16" and device != "cuda":
            raise LayerprobeError("finetune.precision=bf16 needs a CUDA device; use finetune.precision=fp32 (or auto) on the CPU")
        if options.max_length is not None:
            st_model.max_seq_length = options.max_length
        if options.method == "lora":
            _add_lora(st_model, options.lora)
        fit, held_out = _split_held_out(train, options.held_out_fraction, seed)
        rows, notes = _training_rows(fit, base)
        if len(rows[next(iter(rows))]) < (2 if base == "mnrl" else 1):
            raise LayerprobeError(f"{train.dataset}/{train.split}: no pairs to train {base} on "
                                  f"({'no positive pairs' if base == 'mnrl' else 'empty'}); use another finetune.train_split")
        loss = {"mnrl": losses.MultipleNegativesRankingLoss, "cosent": losses.CoSENTLoss, "angle": losses.AnglELoss}[base](st_model)
        if options.loss == "adaptive_layer":
            loss = losses.AdaptiveLayerLoss(st_model, loss)
        elif options.loss == "matryoshka":
            size = st_model.get_sentence_embedding_dimension()
            dims = options.matryoshka_dims or [size // 2 ** k for k in range(8) if size // 2 ** k >= 32]
            if any(d < 1 or d > size for d in dims):
                raise LayerprobeError(f"finetune.matryoshka_dims={dims}: each must be between 1 and the model's size {size}")
            loss = losses.MatryoshkaLoss(st_model, loss, matryoshka_dims=sorted(set(dims), reverse=True))
        curve: dict[str, list[float]] = {"loss": []}
        evaluator = _held_out_evaluator(held_out) if held_out is not None else None
        score_key = None
        if evaluator is not None:
            score_key = f"eval_{evaluator.primary_metric}"
            curve[f"heldout_{'spearman' if held_out.label_kind == 'graded' else 'average_precision'}"] = []

        class Curve(TrainerCallback):
            """Loss per optimizer step and the held-out score per epoch, for the run's step metrics;
            the harness's progress line (a bar on a terminal, log lines in a log file)."""

            def on_train_begin(self, args, state, control, **kwargs):
                from framework.progress import progress

                self.bar = progress(state.max_steps, "finetune", "step")

            def on_step_end(self, args, state, control, **kwargs):
                self.bar.update(1)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    curve["loss"].append(float(logs["loss"]))

            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                if metrics and score_key in metrics:
                    next(v for k, v in curve.items() if k.startswith("heldout_")).append(float(metrics[score_key]))

            def on_train_end(self, args, state, control, **kwargs):
                self.bar.close()

        callbacks = [Curve()]
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".checkpoints-") as checkpoints:
            arguments = SentenceTransformerTrainingArguments(
                output_dir=checkpoints, num_train_epochs=options.epochs, per_device_train_batch_size=options.batch_size,
                per_device_eval_batch_size=max(options.batch_size, 32), learning_rate=options.lr,
                **_warmup(options.warmup_ratio), weight_decay=options.weight_decay, seed=seed, data_seed=seed,
                logging_steps=1, logging_first_step=True, report_to="none", disable_tqdm=True, bf16=bf16,
                dataloader_pin_memory=torch.cuda.is_available(),
                batch_sampler=BatchSamplers.NO_DUPLICATES if base == "mnrl" else BatchSamplers.BATCH_SAMPLER,
                eval_strategy="epoch" if evaluator is not None else "no",
                save_strategy="epoch" if options.patience else "no", save_total_limit=2 if options.patience else None,
                load_best_model_at_end=bool(options.patience), metric_for_best_model=score_key if options.patience else None,
                greater_is_better=True)
            if options.patience:
                from transformers import EarlyStoppingCallback

                callbacks.append(EarlyStoppingCallback(early_stopping_patience=options.patience))
            trainer = SentenceTransformerTrainer(model=st_model, args=arguments, train_dataset=Dataset.from_dict(rows),
                                                 loss=loss, evaluator=evaluator, callbacks=callbacks)
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)  # a dict per step on stdout; the curve goes to the run instead
            trainer.train()
            if options.patience and trainer.state.global_step < trainer.state.max_steps:
                notes.append(f"early stopping after {trainer.state.epoch:.0f} of {options.epochs} epoch(s): the held-out score "
                             f"did not improve for {options.patience}; the best epoch's weights are kept")
        if options.method == "lora":
            _merge_lora(st_model)
        st_model.save(str(out), safe_serialization=True)
        return TuneReport(self.loss_name(train.label_kind), curve, notes, len(rows[next(iter(rows))]))


def _mean_pooling(dimension: int):
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.models import Pooling
    return Pooling(dimension, pooling_mode="mean")


def _warmup(ratio: float) -> dict:
    """Transformers 5 takes the warm-up ratio as a float ``warmup_steps`` (``warmup_ratio`` is deprecated there)."""
    import transformers

    return {"warmup_steps": float(ratio)} if int(transformers.__version__.split(".")[0]) >= 5 else {"warmup_ratio": ratio}


def _split_held_out(train: PairSet, fraction: float, seed: int) -> tuple[PairSet, PairSet | None]:
    """A seeded part of the train pairs set aside for the per-epoch score (None: no part)."""
    if fraction <= 0:
        return train, None
    order = np.random.default_rng(seed).permutation(len(train))
    size = int(math.floor(fraction * len(train)))
    if size < 2 or size >= len(train):
        raise LayerprobeError(f"finetune.held_out_fraction={fraction} of {len(train)} train pairs leaves "
                              f"{size} held out; use a larger fraction or more train pairs")
    held, kept = np.sort(order[:size]), np.sort(order[size:])

    def part(index):
        return PairSet(train.dataset, train.split, [train.ids[i] for i in index], [train.sentences_a[i] for i in index],
                       [train.sentences_b[i] for i in index], train.labels[index], len(index), label_kind=train.label_kind)

    return part(kept), part(held)


def _training_rows(pairs: PairSet, base: str) -> tuple[dict[str, list], list[str]]:
    """The columns the loss reads: (anchor, positive) for mnrl, (sentence1, sentence2, score) else."""
    labels = np.asarray(pairs.labels, dtype=np.float64)
    if base == "mnrl":
        positive = np.flatnonzero(labels == 1)
        notes = [f"mnrl trains on the {len(positive)} positive pairs of {len(pairs)} (in-batch negatives)"]
        return {"anchor": [pairs.sentences_a[i] for i in positive], "positive": [pairs.sentences_b[i] for i in positive]}, notes
    low, high = float(labels.min()), float(labels.max())
    scaled = (labels - low) / (high - low) if high > low else np.zeros_like(labels)
    notes = [f"{base} trains on {len(pairs)} pairs, scores scaled (x - {low:g}) / {high - low:g}"]
    return {"sentence1": list(pairs.sentences_a), "sentence2": list(pairs.sentences_b), "score": scaled.tolist()}, notes


def _held_out_evaluator(pairs: PairSet):
    """sentence-transformers' own evaluator of the held-out pairs: cosine Spearman (graded) or
    cosine average precision (binary), named so the trainer reports ``eval_heldout_…``."""
    try:
        from sentence_transformers.sentence_transformer.evaluation import BinaryClassificationEvaluator, EmbeddingSimilarityEvaluator
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.evaluation import BinaryClassificationEvaluator, EmbeddingSimilarityEvaluator

    if pairs.label_kind == "graded":
        evaluator = EmbeddingSimilarityEvaluator(list(pairs.sentences_a), list(pairs.sentences_b), pairs.labels.tolist(),
                                                 main_similarity="cosine", name="heldout", write_csv=False)
        evaluator.primary_metric = "heldout_spearman_cosine"
    else:
        evaluator = BinaryClassificationEvaluator(list(pairs.sentences_a), list(pairs.sentences_b), pairs.labels.astype(int).tolist(),
                                                  name="heldout", similarity_fn_names=["cosine"], write_csv=False)
        evaluator.primary_metric = "heldout_cosine_ap"
    return evaluator


def _add_lora(st_model, options: LoraOptions) -> None:
    """LoRA adapters on the transformer's attention and dense layers (peft finds them by type)."""
    from peft import LoraConfig, get_peft_model

    transformer, slot = _transformer_slot(st_model)
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout, target_modules="all-linear",
                        bias="none")
    setattr(transformer, slot, get_peft_model(getattr(transformer, slot), config))


def _merge_lora(st_model) -> None:
    """The adapters merged into the weights: the tuned folder is a plain model (no peft to load it)."""
    transformer, slot = _transformer_slot(st_model)
    setattr(transformer, slot, getattr(transformer, slot).merge_and_unload())


def _transformer_slot(st_model) -> tuple[object, str]:
    """The Transformer module and the attribute holding its transformers model (``model`` since
    sentence-transformers 6, where ``auto_model`` is a read-only view of it; ``auto_model`` before)."""
    transformer = st_model[0]
    return transformer, "model" if isinstance(getattr(transformer, "model", None), __import__("torch").nn.Module) else "auto_model"


@hookimpl
def register_finetuners(register):
    register("none", lambda options: NoTuning(), NoOptions)
    register("contrastive", ContrastiveFinetuner, ContrastiveOptions)
