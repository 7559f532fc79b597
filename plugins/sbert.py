"""``encoder=sentence_transformers``: a sentence-transformers model, evaluated as that library embeds.

Without ``layer`` (the default), each sentence is embedded by the model's whole module pipeline
(Transformer → Pooling → Dense → Normalize, whatever ``modules.json`` lists) exactly as
``SentenceTransformer.encode`` does; the encoder hands that vector on as a one-token state, so any
pooler returns it unchanged and the cosine is the library's. With ``layer=k`` it gives the token
states ``hidden_states[k]`` of the model's transformer instead (as ``encoder=hf`` does), to be pooled
by the chosen pooler. Needs ``pip install 'layerprobe[sentence-transformers]'``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence


from framework.data import Layer, TokenStates
from framework.errors import LayerprobeError
from framework.hookspecs import hookimpl
from plugins.hf import HFEncoder, HFOptions, resolve_model


@dataclass
class SentenceTransformersOptions:
    model: str = "sentence-transformers/all-MiniLM-L6-v2"  # hub id, local folder, or package:<module>
    revision: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 64
    special_tokens: str = "exclude"  # with layer=k: whether [CLS]/[SEP] are pooled (as encoder=hf)


class SentenceTransformersEncoder:
    def __init__(self, options: SentenceTransformersOptions):
        if options.batch_size < 1:
            raise LayerprobeError(f"encoder.batch_size={options.batch_size} must be at least 1")
        self.options = options
        self._model = None
        self._layers = HFEncoder(HFOptions(model=options.model, revision=options.revision, device=options.device,
                                           batch_size=options.batch_size, special_tokens=options.special_tokens))

    @property
    def device(self) -> torch.device:
        return self._layers.device  # the same option, read the same way as encoder=hf

    @property
    def model(self):
        if self._model is None:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                raise LayerprobeError("encoder=sentence_transformers needs the sentence-transformers package: "
                                      "pip install 'layerprobe[sentence-transformers]'") from None
            source = resolve_model(self.options.model)
            try:
                self._model = SentenceTransformer(source, revision=self.options.revision, device=str(self.device))
            except (OSError, ValueError) as error:
                first = (str(error).splitlines() or [""])[0][:200]
                raise LayerprobeError(f"encoder.model={self.options.model}: cannot load it with sentence-transformers ({first}); "
                                      "offline? give a local folder or package:<module>") from None
        return self._model

    model_option = "model"  # finetune=…: the same encoder on tuned weights is this one with model=<tuned folder>

    def tunable_model(self) -> tuple[str, str | None]:
        return self._layers.tunable_model()  # the same model and revision options, read the same way as encoder=hf

    def resolve_layer(self, layer: int | None) -> Layer:
        """null: the model's own sentence embedding (its full pipeline); k: hidden_states[k] of its transformer."""
        if layer is None:
            return Layer()
        return self._layers.resolve_layer(layer)

    def fingerprint(self) -> str:
        model = self.model
        digest = hashlib.sha256(repr((self.options.model, self.options.revision, self.options.special_tokens,
                                      [type(m).__name__ for m in model], model.max_seq_length)).encode())
        for name, parameter in sorted(model.state_dict().items()):
            digest.update(name.encode() + parameter.reshape(-1)[:: max(1, parameter.numel() // 64)].float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def encode(self, sentences: Sequence[str], layer: Layer) -> Iterator[TokenStates]:
        import torch

        if layer.index is not None:
            yield from self._layers.encode(sentences, layer)
            return
        from framework.progress import progress

        model = self.model
        bar = progress(len(sentences), "sentence_transformers encode", "sentence")
        for start in range(0, len(sentences), self.options.batch_size):
            chosen = list(range(start, min(start + self.options.batch_size, len(sentences))))
            with torch.no_grad():
                vectors = model.encode([sentences[i] for i in chosen], batch_size=self.options.batch_size,
                                       convert_to_tensor=True, show_progress_bar=False).float()
            counts = Counter(sentences=len(chosen))
            yield TokenStates(vectors[:, None, :], torch.ones(len(chosen), 1, dtype=torch.bool, device=vectors.device),
                              torch.tensor(chosen), counts)
            bar.update(len(chosen))
        bar.close()


@hookimpl
def register_encoders(register):
    register("sentence_transformers", SentenceTransformersEncoder, SentenceTransformersOptions)
