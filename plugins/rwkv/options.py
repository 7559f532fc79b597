"""The RWKV encoder's options (``encoder=rwkv``): importable without torch, so that building the
plugin registry (``--help``, config errors) does not load the model code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RWKVOptions:
    model: str = "RWKV/v6-Finch-1B6-HF"  # hub id, HF folder, or BlinkDL .pth / .safetensors
    version: int | None = None  # 6 (x060) | 7 (x070); null: whichever the checkpoint is (a mismatch is an error)
    revision: str | None = None  # hub revision (branch, tag or commit)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    batch_tokens: int | None = None  # tokens per packed forward; null = 8192 on CUDA (activations within 1 GiB for the 1B6 shape), 4096 on CPU
    fused: bool = True  # CUDA: Triton kernels for the elementwise work between matmuls (false: plain PyTorch)
    cuda_graphs: bool = True  # fused CUDA path: each pack's forward replayed from a CUDA graph (one per 512-token bucket and layer)
    progress: bool = True  # a progress bar for encodes that take more than a few seconds
