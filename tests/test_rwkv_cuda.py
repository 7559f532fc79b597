"""The CUDA path (bf16 weights, fused Triton kernels): runs on a GPU machine, skipped elsewhere.

The kernels themselves are also checked without a GPU, in Triton's interpreter (test_rwkv_fused.py).
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU path is tested in test_rwkv.py)")


def test_bf16_cuda_states_track_fp32_cpu_fused_and_eager(tmp_path):
    from plugins.rwkv.encoder import RWKVEncoder, RWKVOptions
    from plugins.rwkv.random_checkpoint import random_state

    torch.save(random_state(4, 256, 896, 65536), tmp_path / "small.pth")
    sentences = ["The cat sat on the mat.", "Stocks fell sharply on Tuesday.", "短い文", ""]
    pooled = {}
    for name, device, fused in (("cpu", "cpu", True), ("fused", "cuda", True), ("eager", "cuda", False)):
        encoder = RWKVEncoder(RWKVOptions(model=str(tmp_path / "small.pth"), device=device, fused=fused, progress=False))
        vectors = torch.zeros(len(sentences), 256)
        for batch in encoder.encode(sentences, encoder.resolve_layer(-1)):
            mask = batch.mask.unsqueeze(-1).float()
            vectors[batch.sentence_index.cpu()] = ((batch.states * mask).sum(1) / mask.sum(1)).float().cpu()
        pooled[name] = vectors
    for name in ("fused", "eager"):
        cosine = torch.nn.functional.cosine_similarity(pooled["cpu"][:3], pooled[name][:3], dim=1)
        assert float(cosine.min()) >= 0.999, name
        assert torch.equal(pooled[name][3], torch.zeros(256))


def test_safetensors_stream_to_the_gpu_holds_the_files_tensors(tmp_path):
    from plugins.rwkv.checkpoint import load_checkpoint
    from plugins.rwkv.random_checkpoint import random_state, write_hf_folder

    state = random_state(2, 128, 448, 512)
    state["blocks.0.att.time_faaaa"] = state["blocks.0.att.time_faaaa"].to(torch.bfloat16)  # mixed dtypes
    folder = write_hf_folder(state, tmp_path / "hf")
    seen = []
    on_gpu = load_checkpoint(str(folder), device="cuda", on_config=seen.append)
    on_cpu = load_checkpoint(str(folder))
    assert seen == [on_cpu.config]
    assert on_gpu.state.keys() == on_cpu.state.keys()
    for key, tensor in on_cpu.state.items():
        assert on_gpu.state[key].is_cuda and on_gpu.state[key].data_ptr() % 256 == 0
        assert torch.equal(on_gpu.state[key].cpu(), tensor), key
    for block in range(2):  # the fused path's [4, A, C] projections are a view of the streamed buffer
        weights = [on_gpu.state[f"blocks.{block}.att.{name}.weight"] for name in ("key", "value", "receptance", "gate")]
        assert [w.data_ptr() - weights[0].data_ptr() for w in weights] == [i * weights[0].nbytes for i in range(4)]


def test_precompile_covers_every_kernel_the_blocks_launch(tmp_path):
    """After precompile, a forward through every block (and ln_out) compiles nothing new."""
    from plugins.rwkv import fused
    from plugins.rwkv.encoder import RWKVEncoder, RWKVOptions
    from plugins.rwkv.random_checkpoint import random_state

    torch.save(random_state(3, 256, 896, 65536, seed=2), tmp_path / "small.pth")
    encoder = RWKVEncoder(RWKVOptions(model=str(tmp_path / "small.pth"), device="cuda", progress=False))
    fused.precompile(encoder.model.config, torch.device("cuda"))
    kernels = fused.KERNELS
    compiled = [len(k.device_caches[torch.cuda.current_device()][0]) for k in kernels]
    for layer in (0, 1, 3):
        list(encoder.encode(["one sentence", "and another, longer, sentence"], encoder.resolve_layer(layer)))
    assert [len(k.device_caches[torch.cuda.current_device()][0]) for k in kernels] == compiled


def test_packs_run_one_ahead_on_their_own_stream_and_equal_one_big_pack(tmp_path):
    """Many packs, each computed while the caller's stream is still busy with the previous one, give
    the states one pack gives."""
    from plugins.rwkv.encoder import RWKVEncoder, RWKVOptions
    from plugins.rwkv.random_checkpoint import random_state

    torch.save(random_state(3, 256, 896, 65536, seed=4), tmp_path / "small.pth")
    sentences = [f"sentence number {i} is here " * (1 + i % 7) for i in range(60)]
    pooled, batches = {}, {}
    for budget in (96, 1 << 20):
        encoder = RWKVEncoder(RWKVOptions(model=str(tmp_path / "small.pth"), device="cuda", batch_tokens=budget, progress=False))
        vectors, batches[budget] = torch.zeros(len(sentences), 256), 0
        for batch in encoder.encode(sentences, encoder.resolve_layer(2)):
            torch.cuda._sleep(20_000_000)  # the caller's stream stays busy (~10 ms) while the next pack runs
            mask = batch.mask.unsqueeze(-1).float()
            vectors[batch.sentence_index.cpu()] = ((batch.states * mask).sum(1) / mask.sum(1)).float().cpu()
            batches[budget] += 1
        pooled[budget] = vectors
    assert batches[96] >= 10 and batches[1 << 20] == 1
    cosine = torch.nn.functional.cosine_similarity(pooled[96], pooled[1 << 20], dim=1)
    assert float(cosine.min()) >= 0.9999


def test_timing_a_batch_waits_for_that_batch_not_for_work_queued_behind_it():
    """The harness's encode timer must not drain the encoder's own stream (which already computes
    the next pack), or the overlap of packs with the caller's work is lost in every job."""
    from collections import Counter

    from framework.cache import timed
    from framework.data import TokenStates

    side = torch.cuda.Stream()

    def batches():
        states = torch.ones(2, 3, 4, device="cuda")
        with torch.cuda.stream(side):
            torch.cuda._sleep(2_000_000_000)  # about a second of the next pack's work
        yield TokenStates(states, torch.ones(2, 3, dtype=torch.bool, device="cuda"), torch.arange(2), Counter())

    spent = [seconds for batch, seconds in timed(batches()) if batch is not None]
    side.synchronize()
    assert spent[0] < 0.3


def test_cuda_graphs_replay_the_fused_forward_for_packs_of_any_bucket_and_layer(tmp_path):
    """Packs of two buckets at two layers, replayed from CUDA graphs, give the fused forward's states;
    encoding again captures nothing new; a sentence longer than the budget runs without a graph."""
    from plugins.rwkv.encoder import RWKVEncoder, RWKVOptions
    from plugins.rwkv.random_checkpoint import random_state

    torch.save(random_state(3, 256, 896, 65536, seed=5), tmp_path / "small.pth")
    sentences = [f"words, {i} of them, " * (1 + i % 11) for i in range(80)] + ["a long one " * 1200, ""]
    states = {}
    for graphs in (False, True):
        encoder = RWKVEncoder(RWKVOptions(model=str(tmp_path / "small.pth"), device="cuda", batch_tokens=700,
                                          cuda_graphs=graphs, progress=False))
        for repeat in range(2 if graphs else 1):
            for layer in (1, 3):
                rows = {}
                for batch in encoder.encode(sentences, encoder.resolve_layer(layer)):
                    for row, i in enumerate(batch.sentence_index.tolist()):
                        rows[i] = batch.states[row][batch.mask[row]].float().cpu()
                states[graphs, layer] = rows
            if graphs and repeat == 0:
                captured = dict(encoder._graphs.graphs)
    assert {bucket for bucket, _ in captured} == {512, 1024} and {layer for _, layer in captured} == {1, 3}
    assert all(encoder._graphs.graphs[key] is graph for key, graph in captured.items()) and len(encoder._graphs.graphs) == len(captured)
    for layer in (1, 3):
        eager, replayed = states[False, layer], states[True, layer]
        assert eager.keys() == replayed.keys() == set(range(len(sentences)))
        for i in eager:
            assert eager[i].shape == replayed[i].shape
            assert float((eager[i] - replayed[i]).norm() / eager[i].norm().clamp_min(1e-6)) < 1e-2, (layer, i)
