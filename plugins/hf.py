"""Any Hugging Face ``transformers`` model (encoder-only or decoder-only) as an encoder, at any layer.

``layer=k`` is exactly ``hidden_states[k]`` of the model's ``output_hidden_states=True`` output
(entry 0 = the embedding output). For k below the last entry it is the input of transformer layer
k, captured by a pre-hook that stops the forward there, so only layers 0..k-1 run; the last entry
comes from the full model (it includes any final norm, as in GPT-2).
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence


from framework.data import Layer, TokenStates, hidden_state_index
from framework.errors import LayerprobeError
from framework.hookspecs import hookimpl

SPECIAL_TOKENS = ("exclude", "include")


@dataclass
class HFOptions:
    model: str = "sentence-transformers/all-MiniLM-L6-v2"  # hub id, local folder, or package:<module>
    revision: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 64
    max_length: int = 512
    special_tokens: str = "exclude"  # exclude: [CLS]/[SEP]/<s>… are not pooled; include: they are


class _Stop(Exception):
    """Raised by the pre-hook once the requested layer's input is captured."""


class HFEncoder:
    def __init__(self, options: HFOptions):
        if options.special_tokens not in SPECIAL_TOKENS:
            raise LayerprobeError(f"encoder.special_tokens={options.special_tokens}: use exclude or include")
        if options.batch_size < 1:
            raise LayerprobeError(f"encoder.batch_size={options.batch_size} must be at least 1")
        self.options = options
        self._loaded = None

    @property
    def device(self) -> torch.device:
        import torch

        if self.options.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.options.device)

    def _load(self):
        import torch

        if self._loaded is None:
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()  # a "Loading weights" bar per job is noise in sweep logs
            source = resolve_model(self.options.model)
            try:
                tokenizer = AutoTokenizer.from_pretrained(source, revision=self.options.revision)
                dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
                model = AutoModel.from_pretrained(source, revision=self.options.revision, dtype=dtype)
            except pickle.UnpicklingError:  # torch.load(weights_only=True) refused something that is not plain tensors
                raise LayerprobeError(f"encoder.model={self.options.model}: its weights file is a pickle that holds more than "
                                      "tensors, so it was refused (loading it could run code); use a .safetensors checkpoint") from None
            except (OSError, ValueError) as error:
                first = (str(error).splitlines() or [""])[0][:200]
                raise LayerprobeError(f"encoder.model={self.options.model}: cannot load it with transformers ({first}); "
                                      "offline? give a local folder or package:<module>") from None
            if tokenizer.pad_token is None:  # GPT-2 and friends: pad with EOS (right padding, masked)
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            tokenizer.padding_side = "right"
            model = model.to(self.device).eval().requires_grad_(False)
            self._loaded = (tokenizer, model, _layer_list(model), source)
        return self._loaded

    model_option = "model"  # finetune=…: the same encoder on tuned weights is this one with model=<tuned folder>

    def tunable_model(self) -> tuple[str, str | None]:
        """The weights a finetuner starts from: a folder (package:<module> resolved) or hub id, and the revision."""
        return resolve_model(self.options.model), self.options.revision

    def resolve_layer(self, layer: int | None) -> Layer:
        _, _, layers, _ = self._load()
        index = hidden_state_index(layer, len(layers) + 1, f"{len(layers)}-layer model", "0 = embeddings")
        return Layer(requested=layer, index=index, block=index - 1 if index > 0 else None)

    def fingerprint(self) -> str:
        tokenizer, model, _, source = self._load()
        digest = hashlib.sha256(repr((source, self.options.revision, self.options.special_tokens,
                                      self.options.max_length, model.config.to_json_string(), len(tokenizer))).encode())
        for name, parameter in sorted(model.state_dict().items()):
            digest.update(name.encode() + parameter.reshape(-1)[:: max(1, parameter.numel() // 64)].float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def encode(self, sentences: Sequence[str], layer: Layer) -> Iterator[TokenStates]:
        import torch
        from framework.progress import progress

        tokenizer, model, layers, _ = self._load()
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        bar = progress(len(sentences), "hf encode", "sentence")
        for start in range(0, len(order), self.options.batch_size):
            chosen = order[start:start + self.options.batch_size]
            batch = tokenizer([sentences[i] for i in chosen], padding=True, truncation=True,
                              max_length=self.options.max_length, return_tensors="pt", return_special_tokens_mask=True)
            special = batch.pop("special_tokens_mask").bool()
            inputs = {k: v.to(self.device) for k, v in batch.items()}
            with torch.no_grad():
                states = self._hidden_state(model, layers, inputs, layer.index).float()
            mask = batch["attention_mask"].bool()
            if self.options.special_tokens == "exclude":
                mask &= ~special
            counts = Counter(tokens=int(batch["attention_mask"].sum()), pooled_tokens=int(mask.sum()),
                             truncated_sentences=int((batch["attention_mask"].sum(1) >= self.options.max_length).sum()))
            empty = ~mask.any(dim=1)
            if empty.any():  # nothing left to pool (an empty sentence): one zero vector, counted
                counts["sentences_without_tokens"] = int(empty.sum())
                states[empty.to(states.device)] = 0
                mask[empty, 0] = True
            yield TokenStates(states, mask.to(states.device), torch.tensor(chosen), counts)
            bar.update(len(chosen))
        bar.close()

    @staticmethod
    def _hidden_state(model, layers, inputs, index: int) -> torch.Tensor:
        if index == len(layers):
            return model(**inputs, output_hidden_states=True).hidden_states[index]
        captured = {}

        def capture(module, args, kwargs):
            captured["x"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        hook = layers[index].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            model(**inputs)
        except _Stop:
            pass
        finally:
            hook.remove()
        return captured["x"]


def _layer_list(model) -> torch.nn.ModuleList:
    """The model's stack of transformer layers: the ModuleList with num_hidden_layers entries."""
    import torch

    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise LayerprobeError(f"{type(model).__name__}: cannot find its {count} transformer layers; this architecture is not supported")


def resolve_model(model: str) -> str:
    """``package:<module>`` → the model folder a pip package ships; anything else unchanged."""
    if not model.startswith("package:"):
        if model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
            raise LayerprobeError(f"encoder.model={model}: no such folder")
        return model
    name = model.removeprefix("package:")
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise LayerprobeError(f"encoder.model={model}: the package is not installed (pip install "
                              f"{name.replace('_', '-')}, or pip install 'layerprobe[minilm]')") from None
    folder = Path(getattr(module, "MODEL_DIR", Path(module.__file__).parent / "model"))
    if not (folder / "config.json").is_file():
        raise LayerprobeError(f"encoder.model={model}: no config.json in {folder}")
    return str(folder)


@hookimpl
def register_encoders(register):
    register("hf", HFEncoder, HFOptions)
