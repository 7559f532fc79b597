"""One layer of an encoder, pooled (and post-processed, fine-tuned), as an MTEB model.

``framework.api.mteb_model(...)`` builds a job's stages the way the CLI does (``framework.run.plan``),
runs what learns (fine-tuning, a learned pooler, a post-processor) on the train split of
``dataset``, and returns a ``LayerModel``: an object that satisfies mteb 2.x's ``EncoderProtocol``
(``encode(DataLoader of {"text"}, task_metadata=, hf_split=, hf_subset=, prompt_type=)``,
``similarity``, ``similarity_pairwise``) with a ``mteb.ModelMeta``. ``mteb.evaluate(model, tasks)``
then runs any MTEB task on that layer through layerprobe's encoders, token cache and GPU path;
with ``cache=mteb.ResultCache(DIR)`` mteb writes its own results layout
(``results/<name>/<revision>/experiments/<layer, pooler…>/<Task>.json`` + ``model_meta.json``).

Needs ``pip install 'layerprobe[mteb]'`` (tested with mteb 2.26.24).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from framework.errors import LayerprobeError


def model_meta(name: str, revision: str, dimension: int, experiment: dict[str, Any], reference: str | None = None):
    """An ``mteb.ModelMeta`` for a layer: name ``layerprobe/<encoder>__L<layer>__<pooler>[…]``, a
    revision that hashes what makes its vectors, and the ablation's settings as experiment kwargs."""
    from mteb.models.model_meta import ModelMeta

    return ModelMeta(
        loader=None, name=name, revision=revision, release_date=None, languages=None, n_parameters=None,
        memory_usage_mb=None, max_tokens=None, embed_dim=dimension, license=None, open_weights=None,
        public_training_code=None, public_training_data=None, framework=["PyTorch"], reference=reference,
        similarity_fn_name="cosine", use_instructions=False, training_datasets=None, experiment_kwargs=experiment)


def layer_model_name(encoder: str, layer, pooler: str, postprocess: str = "none", finetune: str | None = None) -> str:
    """``layerprobe/<encoder>__L<layer>__<pooler>[__<postprocess>][__<finetune>]``: one name scheme for
    ``mteb_model`` and for ``report --format mteb``."""
    import re

    parts = [encoder, f"L{layer}", pooler] + ([postprocess] if postprocess != "none" else []) + ([finetune] if finetune else [])
    return "layerprobe/" + "__".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(part)) for part in parts)


def cosine_matrix(embeddings1, embeddings2):
    """Every row of the first against every row of the second (``EncoderProtocol.similarity``)."""
    import torch

    a = torch.nn.functional.normalize(torch.atleast_2d(torch.as_tensor(embeddings1).float()), dim=1)
    b = torch.nn.functional.normalize(torch.atleast_2d(torch.as_tensor(embeddings2).float()), dim=1)
    return a @ b.T


def cosine_pairwise(embeddings1, embeddings2):
    """Row i against row i (``EncoderProtocol.similarity_pairwise``)."""
    import torch

    return torch.nn.functional.cosine_similarity(torch.as_tensor(embeddings1).float(), torch.as_tensor(embeddings2).float(), dim=1)


class LayerModel:
    """mteb's ``EncoderProtocol`` over a planned layerprobe job: texts → the job's encoder at its
    layer → its pooler → its fitted post-processor (if any); cosine similarity, as layerprobe scores."""

    def __init__(self, job, postprocessor, meta, dimension: int):
        self.job = job
        self.postprocessor = postprocessor
        self.mteb_model_meta = meta
        self.dimension = dimension

    def encode(self, inputs, *, task_metadata=None, hf_split: str | None = None, hf_subset: str | None = None,
               prompt_type=None, **kwargs):
        """One vector per text of ``inputs`` (a DataLoader of batches with a ``text`` column), in order."""
        from framework.run import embed

        texts = []
        for batch in inputs:
            column = batch.get("text") if isinstance(batch, dict) else None
            if column is None:
                raise LayerprobeError("an MTEB batch without a 'text' column: layerprobe layers embed text only")
            texts.extend(str(text) for text in column)
        if not texts:
            import numpy as np

            return np.zeros((0, self.dimension), dtype=np.float32)
        job = self.job
        vectors = embed(texts, job.encoder, job.pooler, job.layer, job.pooler_identity).vectors
        if self.postprocessor is not None:
            vectors = self.postprocessor.transform(vectors)
        return vectors.float().numpy()

    def similarity(self, embeddings1, embeddings2):
        return cosine_matrix(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        return cosine_pairwise(embeddings1, embeddings2)


def build_layer_model(cfg, registry, components: dict[str, Any], encoder_label: str) -> LayerModel:
    """Plan the job, run what learns on its train split, and wrap it (see the module's docstring)."""
    try:
        import mteb  # noqa: F401
    except ImportError:
        raise LayerprobeError("mteb_model needs the mteb package: pip install 'layerprobe[mteb]'") from None
    from omegaconf import OmegaConf

    from framework.run import fit_pooler, fit_postprocessor, plan, tune_encoder

    job = plan(cfg, registry, components)
    tuned = tune_encoder(job) if job.finetune is not None else None
    fitted = fit_pooler(job)
    postprocessor, _, _ = fit_postprocessor(job, [])
    probe = LayerModel(job, postprocessor, None, 0)

    class One:  # the vector width, from one short text
        def __iter__(self):
            return iter([{"text": ["a"]}])

    dimension = int(probe.encode(One()).shape[1])
    pooler = str(cfg.pooler.name)
    postprocess = str(cfg.postprocess.name) if cfg.get("postprocess") else "none"
    finetune = f"ft-{tuned.report.loss}-{tuned.fingerprint[:8]}" if tuned is not None else None
    name = layer_model_name(encoder_label, job.layer.index, pooler, postprocess, finetune)
    settings = {"encoder": job.encoder.fingerprint(), "layer": job.layer.index, "pooler": OmegaConf.to_container(cfg.pooler),
                "pooler_learned": job.pooler_identity if fitted.origin else None,
                "postprocess": OmegaConf.to_container(cfg.postprocess) if postprocess != "none" else None,
                "postprocess_fit": cfg.postprocess.get("train_split") if postprocess != "none" else None,
                "finetune": tuned.fingerprint if tuned is not None else None, "seed": int(cfg.get("seed", 0))}
    revision = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    experiment = {"layer": job.layer.index, "pooler": pooler}
    if postprocess != "none":
        experiment["postprocess"] = postprocess
    if finetune:
        experiment["finetune"] = finetune
    return LayerModel(job, postprocessor, model_meta(name, revision, dimension, experiment), dimension)


class LookupModel:
    """mteb's ``EncoderProtocol`` over vectors a job already made (``SentenceVectors``): each text is
    looked up, so MTEB's evaluator scores exactly what layerprobe compared (``dataset=mteb``)."""

    def __init__(self, vectors):
        self.index = {sentence: row for row, sentence in enumerate(vectors.sentences)}
        self.vectors = vectors.vectors.float()
        self.mteb_model_meta = None

    def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None, prompt_type=None, **kwargs):
        texts = [str(text) for batch in inputs for text in batch["text"]]
        missing = [t for t in texts if t not in self.index]
        if missing:
            raise LayerprobeError(f"MTEB asked for {len(missing)} sentence(s) the job did not embed (e.g. {missing[0][:60]!r}); "
                                  "dataset=mteb evaluates the split it loaded")
        return self.vectors[[self.index[t] for t in texts]].numpy()

    def similarity(self, embeddings1, embeddings2):
        return cosine_matrix(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        return cosine_pairwise(embeddings1, embeddings2)
