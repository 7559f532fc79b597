"""The CUDA path (Triton WKV, bf16 model): runs on a GPU machine, skipped elsewhere."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU path is tested in test_rwkv.py)")


def test_triton_wkv_matches_the_reference_recurrence():
    from plugins.rwkv.wkv import wkv6_reference
    from plugins.rwkv.wkv_triton import wkv6_triton

    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 5, 17, 45, 12])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    T, H, N = int(lengths.sum()), 4, 64
    r, k, v = (torch.randn(T, H, N, generator=g) for _ in range(3))
    decay = torch.exp(-torch.exp(torch.rand(T, H, N, generator=g) * 4 - 5))
    u = torch.randn(H, N, generator=g) * 0.3
    expected = wkv6_reference(r, k, v, decay, u, cu)
    for block_v, warps in ((64, 2), (64, 4), (32, 2), (16, 1)):
        got = wkv6_triton(*(x.cuda() for x in (r, k, v, decay, u, cu)), block_v=block_v, num_warps=warps).cpu()
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (block_v, warps)


def test_bf16_cuda_states_track_fp32_cpu(tmp_path):
    from plugins.rwkv.encoder import RWKVEncoder, RWKVOptions
    from plugins.rwkv.random_checkpoint import random_state

    torch.save(random_state(4, 256, 896, 65536), tmp_path / "small.pth")
    sentences = ["The cat sat on the mat.", "Stocks fell sharply on Tuesday.", "短い文", ""]
    pooled = {}
    for device in ("cpu", "cuda"):
        encoder = RWKVEncoder(RWKVOptions(model=str(tmp_path / "small.pth"), device=device, progress=False))
        vectors = torch.zeros(len(sentences), 256)
        for batch in encoder.encode(sentences, encoder.resolve_layer(-1)):
            mask = batch.mask.unsqueeze(-1).float()
            vectors[batch.sentence_index.cpu()] = ((batch.states * mask).sum(1) / mask.sum(1)).float().cpu()
        pooled[device] = vectors
    cosine = torch.nn.functional.cosine_similarity(pooled["cpu"][:3], pooled["cuda"][:3], dim=1)
    assert float(cosine.min()) >= 0.999
    assert torch.equal(pooled["cuda"][3], torch.zeros(256))
