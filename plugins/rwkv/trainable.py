"""RWKV-6 and RWKV-7 as a sentence-transformers input module, so ``finetune=contrastive`` trains them.

The module holds ``plugins.rwkv.model.RWKV6`` or ``plugins.rwkv.model7.RWKV7`` (the eager models
whose forwards match BlinkDL's runtime) in float32 and runs it with gradients: the pack of a batch's real tokens (no padding,
``cu_seqlens``), every block, ``ln_out``; sentence-transformers' pooling and losses do the rest.
Its WKV is differentiable everywhere: on CPU the chunked PyTorch form (``plugins.rwkv.wkv``); on
CUDA flash-linear-attention's ``chunk_rwkv6`` / ``chunk_rwkv7`` (forward and backward kernels) when it is installed
(``pip install 'layerprobe[rwkv-train]'``), else the same chunked form. Matmuls run in bf16
under the trainer's autocast on CUDA; the weights and their optimizer state stay float32.

``save`` writes the weights with BlinkDL's key names (``model.safetensors``) and the module's
settings (``rwkv_config.json``): ``encoder=rwkv encoder.model=<that folder>`` reads it, and so does
``SentenceTransformer(<that folder>)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

try:
    from sentence_transformers.base.modules import InputModule
except ImportError:  # sentence-transformers before 6
    from sentence_transformers.models import InputModule

CONFIG_FILE = "rwkv_config.json"
WEIGHTS_FILE = "model.safetensors"


class RWKVTransformer(InputModule):
    """Token embeddings of the last RWKV-6 entry (after ``ln_out``) for sentence-transformers."""

    config_file_name = CONFIG_FILE
    config_keys = ["max_seq_length", "head_size_divisor", "layer_norm_eps"]
    save_in_root = True

    def __init__(self, model, max_seq_length: int | None = None):
        """``model``: ``plugins.rwkv.model.RWKV6`` or ``plugins.rwkv.model7.RWKV7``."""
        super().__init__()
        self.rwkv = model.float().train().requires_grad_(True)
        self.rwkv.fused = False  # the fused Triton kernels are forward-only
        self.max_seq_length = max_seq_length
        self.head_size_divisor = getattr(model.config, "head_size_divisor", 8)  # (RWKV-6's; RWKV-7 has none)
        self.layer_norm_eps = model.config.layer_norm_eps
        self._tokenizer = None
        self._kernel_device = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from plugins.rwkv.tokenizer import WorldTokenizer

            self._tokenizer = WorldTokenizer()
        return self._tokenizer

    def get_embedding_dimension(self) -> int:
        return self.rwkv.config.hidden_size

    get_word_embedding_dimension = get_embedding_dimension  # the name sentence-transformers before 6 asks for

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        """World-tokenizer ids, right-padded, with the attention mask; an empty text is one
        end-of-text token (id 0), so every sentence has a state to pool."""
        texts = [str(text) for text in inputs]
        if prompt:
            texts = [prompt + text for text in texts]
        ids = [row[: self.max_seq_length] if self.max_seq_length else row for row in self.tokenizer.encode_batch(texts)]
        ids = [row or [0] for row in ids]
        width = max(map(len, ids))
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for row, tokens in enumerate(ids):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def tokenize(self, texts, **kwargs):  # sentence-transformers before 6
        return self.preprocess(texts, **kwargs)

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        mask = features["attention_mask"].bool()
        lengths = mask.sum(dim=1)
        cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.long, device=lengths.device)
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        self._use_kernels(mask.device)
        hidden = self.rwkv.hidden_state(features["input_ids"][mask], cu_seqlens, self.rwkv.config.num_layers)
        tokens = hidden.new_zeros(*mask.shape, hidden.shape[-1])
        tokens[mask] = hidden
        return {**features, "token_embeddings": tokens}

    def _use_kernels(self, device: torch.device) -> None:
        """On CUDA, fla's kernels (they have a backward) for every block's WKV, once per device."""
        if self._kernel_device != device:
            from plugins.rwkv.wkv import install_wkv

            install_wkv(self.rwkv, device)
            self._kernel_device = device

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        from safetensors.torch import save_file

        state = {key: value.detach().contiguous().cpu() for key, value in self.rwkv.state_dict().items()}
        save_file(state, os.path.join(output_path, WEIGHTS_FILE), metadata={"format": "pt"})  # one key: safetensors writes a map in no fixed order
        self.save_config(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> "RWKVTransformer":
        """A saved module (``save``'s folder, local); the weights through layerprobe's RWKV loader."""
        from plugins.rwkv.checkpoint import build_model, load_checkpoint

        folder = Path(model_name_or_path) / subfolder
        config = json.loads((folder / CONFIG_FILE).read_text())
        model = build_model(load_checkpoint(str(folder)), "cpu")
        return cls(model, max_seq_length=config.get("max_seq_length"))
