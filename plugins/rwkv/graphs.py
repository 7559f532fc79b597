"""Whole packed forwards of the fused RWKV-6 path as CUDA graphs.

A 24-block forward is ~400 kernel launches. Queueing them from Python costs the host ~25 ms per
pack, and the GPU idles between kernels whose launches arrive late. A CUDA graph queues all of
them in one call, back to back.

A graph has fixed shapes, so a pack is padded to a bucket (the next multiple of ``BUCKET``
tokens) with one-token sentences of token 0, whose states are dropped. Rows never mix in a
matmul, layer norm or token shift (pads start sentences), and the WKV kernel works per sentence,
so the padding cannot change a real token's state. The number of sentences lives on the device
(the WKV kernel reads it), so one graph serves any pack of its bucket. There is one graph per
(bucket, layer); all share one memory pool and one set of input and output buffers, and replay in
order on the encoder's stream.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from plugins.rwkv import fused

BUCKET = 512  # tokens: a pack is padded to a multiple of this (≤ 511 padding tokens)
CAPACITY = 64  # graphs kept per encoder (least recently used dropped): 16 buckets × 4 layers at the default 8192


class PackGraphs:
    """``model.hidden_state`` for packs of up to ``max_tokens`` tokens, replayed from CUDA graphs."""

    def __init__(self, model, device: torch.device, max_tokens: int):
        self.model, self.device = model, device
        self.max_tokens = -(-max_tokens // BUCKET) * BUCKET
        self.size = 0  # tokens the buffers hold: grown to the largest bucket seen (graphs use their addresses)
        # WKV programs per head: as many as the SMs hold at once; they share the sentences through a queue
        resident = fused.launch_choices(torch.cuda.get_device_capability(device))["wkv_programs_per_sm"]
        heads = model.config.num_heads
        self.wkv_programs = -(-torch.cuda.get_device_properties(device).multi_processor_count * resident // heads)
        self.graphs: OrderedDict[tuple[int, int], torch.cuda.CUDAGraph] = OrderedDict()
        self.pool = None

    def fits(self, tokens: int) -> bool:
        return tokens <= self.max_tokens

    def _buffers(self, bucket: int) -> None:
        """Input and output buffers for ``bucket`` tokens; growing them drops the graphs that used the old ones."""
        if bucket <= self.size:
            return
        T, C, device = bucket, self.model.config.hidden_size, self.device
        self.graphs.clear()
        self.pool = None
        self.tokens = torch.zeros(T, dtype=torch.int64, device=device)
        self.cu_seqlens = torch.zeros(T + 1, dtype=torch.int64, device=device)
        self.count = torch.zeros(1, dtype=torch.int64, device=device)
        self.is_start = torch.ones(T, dtype=torch.uint8, device=device)
        self.hidden = torch.empty(T, C, dtype=torch.float32, device=device)
        self.size = bucket

    def hidden_state(self, tokens: np.ndarray, lengths: np.ndarray, index: int) -> torch.Tensor:
        """``hidden_states[index]`` of the pack's tokens [T, C], queued on the current stream; a view
        of the shared output buffer, valid until the next call."""
        T = len(tokens)
        bucket = -(-T // BUCKET) * BUCKET
        key = (bucket, index)
        self._buffers(bucket)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(bucket, index)
            while len(self.graphs) > CAPACITY:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        self._stage(tokens, lengths, bucket)
        graph.replay()
        return self.hidden[:T]

    def _stage(self, tokens: np.ndarray, lengths: np.ndarray, bucket: int) -> None:
        """The pack's inputs, padded to ``bucket``, into the graphs' buffers (on the current stream)."""
        padded, cu_seqlens, is_start = padded_pack(tokens, lengths, bucket)
        ints = torch.from_numpy(np.concatenate([padded, cu_seqlens, [len(cu_seqlens) - 1]])).pin_memory()
        is_start = torch.from_numpy(is_start).pin_memory()
        self.tokens[:bucket].copy_(ints[:bucket], non_blocking=True)
        self.cu_seqlens[: len(cu_seqlens)].copy_(ints[bucket:-1], non_blocking=True)
        self.count.copy_(ints[-1:], non_blocking=True)
        self.is_start[:bucket].copy_(is_start, non_blocking=True)

    def _forward(self, bucket: int, index: int) -> None:
        model = self.model
        blocks = model.blocks[: min(index + 1, model.config.num_layers)]
        final_norm = model.ln_out if index == model.config.num_layers else None
        sentences = fused.Sentences(self.cu_seqlens, self.count, self.wkv_programs)
        fused.run_blocks(blocks, model.embed(self.tokens[:bucket]), self.is_start[:bucket], sentences, final_norm,
                         out=self.hidden[:bucket])

    def _capture(self, bucket: int, index: int) -> torch.cuda.CUDAGraph:
        """One eager pass first, on a bucket of pads (lazy initialisation must not happen inside a
        capture: cuBLAS's workspace for this stream, any kernel not yet loaded), then the capture."""
        self._stage(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), BUCKET)  # 512 pads
        self._forward(BUCKET, index)
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
        try:
            self._forward(bucket, index)
        finally:
            graph.capture_end()
        self.pool = graph.pool()
        return graph


def padded_pack(tokens: np.ndarray, lengths: np.ndarray, bucket: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, cu_seqlens, is_start) of a pack padded to ``bucket`` tokens: the real sentences,
    then one-token sentences of token 0."""
    T = len(tokens)
    padded = np.zeros(bucket, dtype=np.int64)
    padded[:T] = tokens
    cu_seqlens = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64), np.arange(T + 1, bucket + 1, dtype=np.int64)])
    is_start = np.zeros(bucket, dtype=np.uint8)
    is_start[cu_seqlens[:-1]] = 1
    return padded, cu_seqlens, is_start
