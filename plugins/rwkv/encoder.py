"""The ``rwkv`` encoder: RWKV-6 and RWKV-7 hidden states at any layer, packed batches, GPU when available."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import warnings
from collections import Counter, deque
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from framework.data import Layer, TokenStates, hidden_state_index
from framework.errors import LayerprobeError
from plugins.rwkv.options import RWKVOptions  # noqa: F401  (re-exported: the encoder's options)


PACKS_AHEAD = 1  # CUDA: packs queued on the GPU beyond the one the caller is handed (each holds its states)


class RWKVEncoder:
    def __init__(self, options: RWKVOptions):
        self.options = options
        if options.device not in ("auto", "cpu") and not options.device.startswith("cuda"):
            raise LayerprobeError(f"encoder.device={options.device}: use auto, cpu, cuda or cuda:N")
        if options.version not in (None, 6, 7):
            raise LayerprobeError(f"encoder.version={options.version}: use 6 (RWKV-6, x060), 7 (RWKV-7, x070) or null (from the checkpoint)")
        if options.device.startswith("cuda") and not torch.cuda.is_available():
            raise LayerprobeError(f"encoder.device={options.device} but torch sees no CUDA device; use encoder.device=cpu")
        self._model = None
        self._tokenizer = None
        self._checkpoint_source = ""
        self._stream = None  # CUDA: the stream the forwards run on (see _forwards)
        self._graphs = None  # fused CUDA path: plugins.rwkv.graphs.PackGraphs, made at the first pack

    @property
    def device(self) -> torch.device:
        if self.options.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.options.device)

    @property
    def model(self):
        if self._model is None:
            from plugins.rwkv.checkpoint import build_model, load_checkpoint

            device, compiling = self.device, []
            fused = self.options.fused and device.type == "cuda"
            if fused and importlib.util.find_spec("triton") is None:
                warnings.warn("Triton is not installed, so RWKV-6 runs its plain PyTorch path on CUDA (slower); "
                              "PyTorch's CUDA builds include Triton")
                fused = False

            def precompile(config):  # the kernels compile while the weights stream in (RWKV-6's)
                if getattr(config, "version", 6) != 6:
                    return
                from plugins.rwkv.fused import precompile_in_background

                compiling.append(precompile_in_background(config, device))

            checkpoint = load_checkpoint(self.options.model, self.options.revision, device, precompile if fused else None)
            version = getattr(checkpoint.config, "version", 6)
            if self.options.version is not None and self.options.version != version:
                raise LayerprobeError(f"encoder.version={self.options.version} but {self.options.model} is an RWKV-{version} "
                                      f"checkpoint; set encoder.version={version} (or null) or point encoder.model at an "
                                      f"RWKV-{self.options.version} checkpoint")
            self._checkpoint_source = checkpoint.source
            self._fingerprint = _fingerprint(checkpoint)
            model = build_model(checkpoint, device)
            model.fused = fused and version == 6  # the fused Triton kernels are RWKV-6's
            if device.type == "cuda" and version == 7:
                from plugins.rwkv.wkv import install_wkv

                if not install_wkv(model, device):
                    warnings.warn("flash-linear-attention is not installed, so RWKV-7 runs its step-by-step PyTorch WKV "
                                  "on CUDA (slow): pip install 'layerprobe[rwkv-train]'")
            for thread in compiling:
                thread.join()
                if thread.error is not None:  # only a head start was lost: kernels compile at first use
                    warnings.warn(f"precompiling the RWKV-6 kernels failed ({type(thread.error).__name__}: {thread.error})")
            self._model = model
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from plugins.rwkv.tokenizer import WorldTokenizer

            self._tokenizer = WorldTokenizer()
        return self._tokenizer

    def resolve_layer(self, layer: int | None) -> Layer:
        """``layer=k`` is Hugging Face's ``hidden_states[k]``: block k's output; the last is after ln_out."""
        blocks = self.model.num_hidden_states - 1
        index = hidden_state_index(layer, blocks + 1, f"{blocks}-block RWKV-{self.version}",
                                   f"0..{blocks - 1} = block outputs, {blocks} = after ln_out")
        return Layer(requested=layer, index=index, block=min(index, blocks - 1))

    def fingerprint(self) -> str:
        self.model
        return self._fingerprint

    model_option = "model"  # finetune=…: the same encoder on tuned weights is this one with model=<tuned folder>

    def tunable_model(self) -> tuple[str, str | None]:
        return self.options.model, self.options.revision

    def training_module(self):
        """The checkpoint as a differentiable sentence-transformers module (float32, on the CPU until
        the trainer moves it): what ``finetune=contrastive`` trains."""
        from plugins.rwkv.checkpoint import build_model, load_checkpoint
        from plugins.rwkv.trainable import RWKVTransformer

        return RWKVTransformer(build_model(load_checkpoint(self.options.model, self.options.revision, "cpu"), "cpu"))

    def encode(self, sentences: Sequence[str], layer: Layer) -> Iterator[TokenStates]:
        return self.encode_tokens(self.tokenizer.encode_batch(list(sentences)), layer)

    def encode_tokens(self, ids: list[list[int]], layer: Layer) -> Iterator[TokenStates]:
        """Token states of already-tokenised sentences (what ``encode`` does after tokenising)."""
        model, device = self.model, self.device
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        empty = np.flatnonzero(lengths == 0)
        counts = Counter(tokens=int(lengths.sum()), empty_sentences=len(empty))
        if len(empty):  # nothing to run the model on: one zero state each, counted
            yield TokenStates(torch.zeros(len(empty), 1, model.config.hidden_size, device=device),
                              torch.ones(len(empty), 1, dtype=torch.bool, device=device), torch.from_numpy(empty), counts)
            counts = Counter()
        order = np.argsort(-lengths, kind="stable")
        order = order[lengths[order] > 0]
        budget = self._budget(device)
        from framework.progress import progress as progress_of

        progress = progress_of(int(lengths.sum()), "rwkv encode", "token", self.options.progress)
        with torch.no_grad():
            for pack, states, mask in self._forwards(_packs(order, lengths, budget), ids, lengths, layer.index, device):
                yield TokenStates(states, mask, torch.from_numpy(pack), counts)
                counts = Counter()
                progress.update(int(lengths[pack].sum()))
        progress.close()

    @property
    def version(self) -> int:
        return getattr(self.model.config, "version", 6)

    def can_resume_from(self, layer: Layer) -> bool:
        """RWKV-6 block outputs are the residual stream, so later blocks can continue from them;
        RWKV-7's later blocks also read block 0's values (v_first), which the cache does not keep."""
        return self.version == 6 and layer.index < self.model.config.num_layers

    def resume(self, batch: TokenStates, sentences: Sequence[str], start: Layer, layer: Layer) -> TokenStates:
        """States at ``layer`` from cached states at the shallower block output ``start``."""
        if all(sentences[i] == "" for i in batch.sentence_index.tolist()):
            return batch  # empty sentences: zero states at every layer
        device, mask = self.device, batch.mask.to(self.device)
        lengths = batch.mask.sum(dim=1)
        cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        with torch.no_grad():
            hidden = self.model.continue_from(batch.states.to(device)[mask].float(), cu_seqlens.to(device), start.index, layer.index)
        states = hidden.new_zeros(*batch.mask.shape, hidden.shape[1])
        states[mask] = hidden
        return TokenStates(states, mask, batch.sentence_index, batch.counts)

    def _forwards(self, packs, ids, lengths, index, device) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """(pack, states, mask) for each pack. On CUDA the forwards run on a stream of their own,
        ``PACKS_AHEAD`` packs ahead: while the caller pools and copies pack k on its stream, the GPU
        already computes the next, so the host's work between packs never leaves the GPU idle."""
        if device.type != "cuda":
            for pack in packs:
                yield pack, *self._forward(pack, ids, lengths, index, device)
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        caller = torch.cuda.current_stream(device)
        queued = deque()
        for pack in packs:
            with torch.cuda.stream(self._stream):
                states, mask = self._forward(pack, ids, lengths, index, device)
                done = torch.cuda.Event()
                done.record(self._stream)
            queued.append((pack, states, mask, done))
            if len(queued) > PACKS_AHEAD:
                yield _hand_over(*queued.popleft(), caller)
        while queued:
            yield _hand_over(*queued.popleft(), caller)

    def _forward(self, pack, ids, lengths, index, device):
        """Queue one pack's forward; nothing here waits for the GPU (inputs go through pinned memory,
        and the scatter into padded rows uses positions computed on the host)."""
        pack_lengths = torch.from_numpy(lengths[pack])
        tokens = self._pack_tokens(pack, ids, lengths)
        graphs = self._pack_graphs(device)
        if graphs is not None and graphs.fits(len(tokens)):
            hidden = graphs.hidden_state(tokens, lengths[pack], index)
        else:
            cu_seqlens = torch.zeros(len(pack) + 1, dtype=torch.int64)
            cu_seqlens[1:] = torch.cumsum(pack_lengths, 0)
            hidden = self.model.hidden_state(_to(torch.from_numpy(tokens), device), _to(cu_seqlens, device), index)
        width = int(pack_lengths.max())
        mask = torch.arange(width)[None, :] < pack_lengths[:, None]
        positions = mask.view(-1).nonzero().squeeze(1)  # row-major: the packed token order
        states = hidden.new_zeros(len(pack), width, hidden.shape[1])
        states.view(-1, hidden.shape[1]).index_copy_(0, _to(positions, device), hidden)
        return states, _to(mask, device)

    def _pack_tokens(self, pack, ids, lengths) -> np.ndarray:
        """The pack's token ids back to back, checked against the vocabulary before the model sees
        them (an id past the embedding would be a device-side fault on CUDA). Checked per pack, not
        over all sentences first: the host's work before the GPU starts is then one pack's."""
        tokens = np.fromiter(itertools.chain.from_iterable(ids[i] for i in pack), dtype=np.int64, count=int(lengths[pack].sum()))
        vocab = self.model.config.vocab_size
        if len(tokens) and tokens.max() >= vocab:
            raise LayerprobeError(f"the world tokenizer gave token id {tokens.max()} but the checkpoint's vocabulary has {vocab}; "
                                  "use a checkpoint with the 65536-token RWKV world vocabulary")
        if len(tokens) and tokens.min() < 0:
            raise LayerprobeError(f"token id {tokens.min()} is negative; token ids index the checkpoint's {vocab}-token vocabulary")
        return tokens

    def _budget(self, device) -> int:
        """Tokens per pack: ``batch_tokens``, else 8192 on CUDA (the 1B6 model's activations within 1 GiB), 4096 on CPU."""
        return self.options.batch_tokens or (8192 if device.type == "cuda" else 4096)

    def _pack_graphs(self, device):
        """The CUDA graphs of the fused path (None elsewhere, or with ``cuda_graphs=false``)."""
        if self._graphs is None and self.options.cuda_graphs and device.type == "cuda" and self.model.fused:
            from plugins.rwkv.graphs import PackGraphs

            self._graphs = PackGraphs(self.model, device, self._budget(device))
        return self._graphs


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without making the host wait (pinned, asynchronous copy)."""
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


def _hand_over(pack, states, mask, done, caller):
    """A pack's results for use on the caller's stream, once the encoder's stream has made them."""
    caller.wait_event(done)
    states.record_stream(caller)  # the allocator keeps their memory until the caller's uses are done
    mask.record_stream(caller)
    return pack, states, mask


def _packs(order: np.ndarray, lengths: np.ndarray, budget: int) -> Iterator[np.ndarray]:
    start = 0
    while start < len(order):
        end, total = start, 0
        while end < len(order) and (end == start or total + lengths[order[end]] <= budget):
            total += lengths[order[end]]
            end += 1
        yield order[start:end]
        start = end


def _fingerprint(checkpoint) -> str:
    """Config, tokenizer and a sample of every tensor: changes whenever the weights do, cheaply."""
    digest = hashlib.sha256(repr((checkpoint.config, "rwkv_vocab_v20230424")).encode())
    keys = sorted(checkpoint.state)
    samples = [checkpoint.state[k].reshape(-1)[:: max(1, checkpoint.state[k].numel() // 256)].float() for k in keys]
    on_host = torch.cat(samples).cpu().numpy() if samples else np.zeros(0, np.float32)  # one transfer from a GPU
    start = 0
    for key, sample in zip(keys, samples):
        digest.update(key.encode() + repr(tuple(checkpoint.state[key].shape)).encode())
        digest.update(on_host[start: start + sample.numel()].tobytes())
        start += sample.numel()
    return digest.hexdigest()[:16]
