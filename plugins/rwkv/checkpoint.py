"""Load RWKV-6 and RWKV-7 weights from a Hugging Face folder (or hub id) or a BlinkDL ``.pth`` /
``.safetensors``, the version and shapes inferred from the keys (x070 has ``att.r_k``).

Every layout is turned into BlinkDL's key names, which ``plugins.rwkv.model.RWKV6`` and
``plugins.rwkv.model7.RWKV7`` use. fla-hub's RWKV-7 folders (``RWKV7ForCausalLM``, e.g.
``fla-hub/rwkv7-1.5B-world``) map as ``FLA7_NAMES`` says: ``model.embeddings`` → ``emb``,
``model.layers.{i}.{pre_norm,attn_norm,ffn_norm}`` → ``blocks.{i}.{ln0,ln1,ln2}``,
``attn.{r,k,v,o}_proj`` → ``att.{receptance,key,value,output}``, ``attn.{w,a,v,g}_lora.lora.0.weight``
→ ``att.{w,a,v,g}1`` (transposed), ``….lora.2.weight`` → ``…2`` (transposed), ``….lora.2.bias`` →
``att.{w,a,v}0``, ``attn.g_norm`` → ``att.ln_x``, ``attn.{x_*,k_k,k_a,r_k}`` and ``ffn.*`` by name,
``model.norm`` → ``ln_out``, ``lm_head`` → ``head``.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from framework.errors import LayerprobeError
from plugins.rwkv.model import RWKV6, RWKV6Config
from plugins.rwkv.model7 import RWKV7, RWKV7Config

HF_RENAMES = ((r"^rwkv\.", ""), (r"^embeddings\.", "emb."), (r"\.pre_ln\.", ".ln0."),
              (r"\.attention\.", ".att."), (r"\.feed_forward\.", ".ffn."))
# The attention projections that the fused CUDA path multiplies as one [4, A, C] batch, in its
# order: streamed files place them back to back in this order, so that batch is a view (no copy).
PROJECTIONS = ("key", "value", "receptance", "gate")
HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                "pytorch_model.bin.index.json", "*.txt"]


# fla-hub RWKV-7 (pattern on the fla name) → BlinkDL x070 name, and whether the tensor is a transposed LoRA matrix
FLA7_NAMES = (
    (r"^model\.embeddings\.weight$", "emb.weight", False),
    (r"^lm_head\.weight$", "head.weight", False),
    (r"^model\.norm\.", "ln_out.", False),
    (r"^model\.layers\.(\d+)\.pre_norm\.", r"blocks.\1.ln0.", False),
    (r"^model\.layers\.(\d+)\.attn_norm\.", r"blocks.\1.ln1.", False),
    (r"^model\.layers\.(\d+)\.ffn_norm\.", r"blocks.\1.ln2.", False),
    (r"^model\.layers\.(\d+)\.attn\.r_proj\.", r"blocks.\1.att.receptance.", False),
    (r"^model\.layers\.(\d+)\.attn\.k_proj\.", r"blocks.\1.att.key.", False),
    (r"^model\.layers\.(\d+)\.attn\.v_proj\.", r"blocks.\1.att.value.", False),
    (r"^model\.layers\.(\d+)\.attn\.o_proj\.", r"blocks.\1.att.output.", False),
    (r"^model\.layers\.(\d+)\.attn\.([wavg])_lora\.lora\.0\.weight$", r"blocks.\1.att.\g<2>1", True),
    (r"^model\.layers\.(\d+)\.attn\.([wavg])_lora\.lora\.2\.weight$", r"blocks.\1.att.\g<2>2", True),
    (r"^model\.layers\.(\d+)\.attn\.([wav])_lora\.lora\.2\.bias$", r"blocks.\1.att.\g<2>0", False),
    (r"^model\.layers\.(\d+)\.attn\.g_norm\.", r"blocks.\1.att.ln_x.", False),
    (r"^model\.layers\.(\d+)\.attn\.", r"blocks.\1.att.", False),
    (r"^model\.layers\.(\d+)\.ffn\.", r"blocks.\1.ffn.", False),
)


def fla7_to_blinkdl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in state.items():
        for pattern, replacement, transposed in FLA7_NAMES:
            if re.search(pattern, key):
                key, tensor = re.sub(pattern, replacement, key), (tensor.t() if transposed else tensor)
                break
        renamed[key] = tensor
    return renamed


def blinkdl7_to_fla(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``fla7_to_blinkdl`` (random checkpoints in fla-hub's layout, for tests)."""
    inverse = {"emb.weight": "model.embeddings.weight", "head.weight": "lm_head.weight"}
    out = {}
    for key, tensor in state.items():
        if re.match(r"blocks\.0\.att\.v[012]$", key):
            continue  # x070 never uses block 0's value residual; fla has no v_lora there
        if key in inverse:
            out[inverse[key]] = tensor
            continue
        if key.startswith("ln_out."):
            out["model.norm." + key.split(".", 1)[1]] = tensor
            continue
        block, rest = re.match(r"blocks\.(\d+)\.(.*)", key).groups()
        prefix = f"model.layers.{block}."
        names = {"ln0.": "pre_norm.", "ln1.": "attn_norm.", "ln2.": "ffn_norm.", "att.receptance.": "attn.r_proj.",
                 "att.key.": "attn.k_proj.", "att.value.": "attn.v_proj.", "att.output.": "attn.o_proj.", "att.ln_x.": "attn.g_norm."}
        lora = re.match(r"att\.([wavg])([012])$", rest)
        if lora:
            kind, part = lora.groups()
            name = {"0": "lora.2.bias", "1": "lora.0.weight", "2": "lora.2.weight"}[part]
            out[f"{prefix}attn.{kind}_lora.{name}"] = tensor.reshape(-1) if part == "0" else tensor.t().contiguous()
            continue
        for old, new in names.items():
            if rest.startswith(old):
                out[prefix + new + rest[len(old):]] = tensor
                break
        else:
            flat = rest.endswith(("k_k", "k_a")) or rest == "ffn.x_k"
            out[prefix + rest.replace("att.", "attn.", 1)] = tensor.reshape(-1) if flat else tensor
    return out


@dataclass
class Checkpoint:
    config: RWKV6Config | RWKV7Config
    state: dict[str, torch.Tensor]
    source: str


def load_checkpoint(model: str, revision: str | None = None, device: str | torch.device = "cpu",
                    on_config: Callable[[RWKV6Config], None] | None = None) -> Checkpoint:
    """Weights from a local folder, a local ``.pth``/``.safetensors`` file, or a hub id (downloaded
    when online). ``on_config`` is called with the config before the tensors are read (shapes
    come from the files' headers), so work that needs only shapes can overlap the reading.
    On CUDA, safetensors files are streamed straight into GPU memory."""
    path = Path(model).expanduser()
    if path.is_dir() and (path / TRAINED_CONFIG).is_file():
        return _from_trained_folder(path, torch.device(device), on_config)
    if path.is_dir():
        return _from_hf_folder(path, None, torch.device(device), on_config)
    if path.is_file():
        opened = _open(path, torch.device(device))
        config = infer_any_config(opened.layout, str(path))
        if on_config:
            on_config(config)
        return Checkpoint(config, opened.read(), f"file:{path.resolve()}")
    if model.startswith((".", "/", "~")) or model.endswith((".pth", ".pt", ".safetensors")) or model.count("/") != 1:
        raise LayerprobeError(f"encoder.model={model}: no such file or folder; give an RWKV-6/RWKV-7 Hugging Face folder, "
                              "a BlinkDL .pth or .safetensors file, or a hub id such as RWKV/v6-Finch-1B6-HF or "
                              "fla-hub/rwkv7-1.5B-world")
    return _from_hf_folder(_download(model, revision), f"hub:{model}" + (f"@{revision}" if revision else ""),
                           torch.device(device), on_config)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as error:  # offline, unknown repo, gated repo: many exception types
        first = (str(error).splitlines() or [""])[0][:200]
        raise LayerprobeError(f"encoder.model={repo_id}: could not fetch it from the Hugging Face hub "
                              f"({type(error).__name__}: {first}); offline? point encoder.model at a local folder or .pth") from None


def _from_hf_folder(folder: Path, source: str | None, device: torch.device, on_config) -> Checkpoint:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise LayerprobeError(f"{folder}: no config.json; an RWKV-6 Hugging Face folder has config.json and weights")
    try:
        hf = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LayerprobeError(f"{config_file}: not valid JSON ({error})") from None
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise LayerprobeError(f"{folder}: no weights (model*.safetensors or pytorch_model*.bin) beside config.json")
    opened = [_open(file, device) for file in files]
    if hf.get("model_type") == "rwkv7" or any(".attn.r_proj." in k for o in opened for k in o.layout):
        layout = fla7_to_blinkdl({k: v for o in opened for k, v in o.layout.items()})
        config = infer_config7(layout, str(folder), layer_norm_eps=float(hf.get("norm_eps", 1e-5)))
        if on_config:
            on_config(config)
        state = fla7_to_blinkdl({k: v for o in opened for k, v in o.read().items()})
        return Checkpoint(config, state, source or f"folder:{folder.resolve()}")
    layout = _hf_names({k: v for o in opened for k, v in o.layout.items()})
    divisor = int(hf.get("head_size_divisor", 8))
    config = infer_config(layout, str(folder), head_size_divisor=divisor, layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)))
    expected = {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_layers,
                "vocab_size": config.vocab_size, "head_size": config.head_size}
    for key, value in expected.items():
        if key in hf and hf[key] is not None and int(hf[key]) != value:
            raise LayerprobeError(f"{config_file}: {key}={hf[key]} but the weights say {value}; the folder is inconsistent")
    if on_config:
        on_config(config)
    state = _hf_names({k: v for o in opened for k, v in o.read().items()})
    return Checkpoint(config, state, source or f"folder:{folder.resolve()}")


TRAINED_CONFIG = "rwkv_config.json"  # beside model.safetensors: a folder that finetune=contrastive wrote (plugins.rwkv.trainable)


def _from_trained_folder(folder: Path, device: torch.device, on_config) -> Checkpoint:
    """A fine-tuned RWKV-6 (a sentence-transformers folder): BlinkDL key names in model.safetensors."""
    try:
        settings = json.loads((folder / TRAINED_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LayerprobeError(f"{folder / TRAINED_CONFIG}: not valid JSON ({error})") from None
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise LayerprobeError(f"{folder}: {TRAINED_CONFIG} but no model.safetensors beside it; the fine-tuned folder is incomplete")
    opened = _open(weights, device)
    config = infer_any_config(opened.layout, str(weights), head_size_divisor=int(settings.get("head_size_divisor", 8)),
                              layer_norm_eps=float(settings.get("layer_norm_eps", 1e-5)))
    if on_config:
        on_config(config)
    return Checkpoint(config, opened.read(), f"folder:{folder.resolve()}")


def _hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in state.items():
        for pattern, replacement in HF_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = tensor
    return renamed


@dataclass
class _Opened:
    """A weights file whose shapes are known (``layout``: meta or memory-mapped tensors) and whose
    tensors ``read`` returns, on the target device where that saves a copy."""
    layout: dict[str, torch.Tensor]
    read: Callable[[], dict[str, torch.Tensor]]


def _open(file: Path, device: torch.device) -> _Opened:
    if file.suffix == ".safetensors":
        header, data_start = _safetensors_header(file)
        layout = {key: torch.empty(info["shape"], dtype=info["dtype"], device="meta") for key, info in header.items()}
        if device.type == "cuda":
            return _Opened(layout, lambda: _stream_safetensors(file, header, data_start, device))
        return _Opened(layout, lambda: _read_tensors(file))
    state = _read_tensors(file)  # memory-mapped: nothing is read until a tensor is used
    return _Opened(state, lambda: state)


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def _safetensors_header(file: Path) -> tuple[dict[str, dict], int]:
    """The safetensors header (8-byte little-endian length, then JSON): name → dtype, shape, byte range."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 2 <= length <= min(size - 8, 100 << 20):
                raise ValueError(f"header length {length} in a {size}-byte file")
            raw = json.loads(handle.read(length))
        header = {}
        for key, info in raw.items():
            if key == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            if not 0 <= begin <= end <= size - 8 - length or end - begin != dtype.itemsize * math.prod(info["shape"]):
                raise ValueError(f"{key}: byte range {begin}..{end} does not fit its shape or the file")
            header[key] = {"dtype": dtype, "shape": list(info["shape"]), "begin": begin, "end": end}
        return header, 8 + length
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
        raise LayerprobeError(f"{file}: not a readable safetensors file ({type(error).__name__}: {str(error)[:160]}); "
                              "re-download or re-convert it") from None


STREAM_CHUNK = 64 << 20  # bytes per read; two pinned buffers of this size alternate


def _stream_safetensors(file: Path, header: dict[str, dict], data_start: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The file's tensors in GPU memory: large sequential reads into two pinned host buffers, each
    copied asynchronously while the next is read; no per-tensor host copy, no page-by-page faults
    of a memory map. Each tensor lands 256-byte aligned (what cuBLAS and Triton kernels like)."""
    entries = sorted(header.items(), key=lambda item: item[1]["begin"])
    offsets, total = {}, 0
    for key in _destination_order([key for key, _ in entries]):
        offsets[key] = total
        total += -(-(header[key]["end"] - header[key]["begin"]) // 256) * 256
    buffer = torch.empty(max(total, 1), dtype=torch.uint8, device=device)
    data_end = max((info["end"] for info in header.values()), default=0)
    staging = [torch.empty(min(STREAM_CHUNK, max(data_end, 1)), dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    copied: list = [None, None]
    stream = torch.cuda.Stream(device)
    entry = 0
    with open(file, "rb", buffering=0) as handle, torch.cuda.stream(stream):
        handle.seek(data_start)
        for index, position in enumerate(range(0, data_end, STREAM_CHUNK)):
            slot = index % 2
            if copied[slot] is not None:
                copied[slot].synchronize()  # its previous copy is done: the buffer may be overwritten
            size = min(STREAM_CHUNK, data_end - position)
            view = memoryview(staging[slot].numpy())[:size]
            got = 0
            while got < size:
                count = handle.readinto(view[got:])
                if not count:
                    raise LayerprobeError(f"{file}: ends early (truncated?); re-download or re-convert it")
                got += count
            while entry < len(entries) and entries[entry][1]["end"] <= position:
                entry += 1
            for key, info in entries[entry:]:
                if info["begin"] >= position + size:
                    break
                first, last = max(info["begin"], position), min(info["end"], position + size)
                target = offsets[key] + first - info["begin"]
                buffer[target: target + last - first].copy_(staging[slot][first - position: last - position], non_blocking=True)
            copied[slot] = torch.cuda.Event()
            copied[slot].record(stream)
    stream.synchronize()
    return {key: buffer[offsets[key]: offsets[key] + info["end"] - info["begin"]].view(info["dtype"]).view(info["shape"])
            for key, info in header.items()}


def _destination_order(keys: list[str]) -> list[str]:
    """``keys`` in file order, except that each block's four attention projections (either naming)
    come together, in ``PROJECTIONS`` order."""
    pattern = re.compile(r"(.*\.(?:att|attention))\.(" + "|".join(PROJECTIONS) + r")\.weight")
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        if match := pattern.fullmatch(key):
            groups.setdefault(match.group(1), {})[match.group(2)] = key
    order, placed = [], set()
    for key in keys:
        match = pattern.fullmatch(key)
        together = [groups[match.group(1)][role] for role in PROJECTIONS] if match and len(groups[match.group(1)]) == 4 else [key]
        order += [k for k in together if k not in placed]
        placed.update(together)
    return order


# torch.save's legacy (pre-1.6, non-zip) format: a pickle whose first object is this magic number.
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix != ".safetensors" and not zipfile.is_zipfile(file):
        with open(file, "rb") as handle:
            legacy = handle.read(len(LEGACY_TORCH_MAGIC)) == LEGACY_TORCH_MAGIC
        if legacy:
            raise LayerprobeError(f"{file} is in PyTorch's legacy (non-zip) format, which cannot be memory-mapped; convert it once: "
                                  f"python -m plugins.rwkv.convert {file} {file.with_suffix('.safetensors')}")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch/safetensors raise many types for a damaged or foreign file
        raise LayerprobeError(f"{file}: cannot read it as a checkpoint ({type(error).__name__}: {str(error)[:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LayerprobeError(f"{file}: not a state dict of tensors")
    return state


def infer_any_config(state: dict[str, torch.Tensor], where: str, head_size_divisor: int = 8,
                     layer_norm_eps: float = 1e-5) -> RWKV6Config | RWKV7Config:
    """x070 (RWKV-7) when block 0 has ``att.r_k``, else x060 (RWKV-6)."""
    if "blocks.0.att.r_k" in state:
        return infer_config7(state, where, layer_norm_eps)
    return infer_config(state, where, head_size_divisor, layer_norm_eps)


def infer_config7(state: dict[str, torch.Tensor], where: str, layer_norm_eps: float = 1e-5) -> RWKV7Config:
    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise LayerprobeError(f"{where}: missing '{key}'; is this an RWKV-7 (x070) checkpoint?")
        return state[key]

    vocab, hidden = need("emb.weight").shape
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    heads, head_size = need("blocks.0.att.r_k").shape
    return RWKV7Config(
        vocab_size=vocab, hidden_size=hidden, num_layers=max(blocks) + 1, ffn_size=need("blocks.0.ffn.key.weight").shape[0],
        head_size=head_size, decay_rank=need("blocks.0.att.w1").shape[1], a_rank=need("blocks.0.att.a1").shape[1],
        v_rank=need("blocks.1.att.v1").shape[1] if "blocks.1.att.v1" in state else need("blocks.0.att.v1").shape[1],
        gate_rank=need("blocks.0.att.g1").shape[1], deep_embed="blocks.0.ffn.s_emb.weight" in state,
        layer_norm_eps=layer_norm_eps)


def infer_config(state: dict[str, torch.Tensor], where: str, head_size_divisor: int = 8, layer_norm_eps: float = 1e-5) -> RWKV6Config:
    """Shapes → config; a missing key that an RWKV-6 checkpoint must have is a one-line error."""
    def need(key: str) -> torch.Tensor:
        if key not in state:
            hint = " (an RWKV-5 or older checkpoint?)" if "time_maa" in key else ""
            raise LayerprobeError(f"{where}: missing '{key}'{hint}; is this an RWKV-6 checkpoint?")
        return state[key]

    vocab, hidden = need("emb.weight").shape
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise LayerprobeError(f"{where}: no 'blocks.N.*' weights; is this an RWKV-6 checkpoint?")
    heads, head_size = need("blocks.0.att.time_faaaa").reshape(-1, need("blocks.0.att.time_faaaa").shape[-1]).shape
    return RWKV6Config(
        vocab_size=vocab, hidden_size=hidden, num_layers=max(blocks) + 1,
        ffn_size=need("blocks.0.ffn.key.weight").shape[0],
        attention_size=need("blocks.0.att.key.weight").shape[0],
        head_size=head_size, head_size_divisor=head_size_divisor, layer_norm_eps=layer_norm_eps,
        mix_rank=need("blocks.0.att.time_maa_w2").shape[1], decay_rank=need("blocks.0.att.time_decay_w1").shape[1],
    )


# Matrices that run through matmuls (and the embedding); every other tensor is a vector or norm.
LOW_RANK = ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2",
            ".w1", ".w2", ".a1", ".a2", ".v1", ".v2", ".g1", ".g2", ".s1", ".s2")  # (x060, then x070)


def parameter_dtype(key: str, tensor: torch.Tensor, device: torch.device) -> torch.dtype:
    """float32 on CPU. CUDA: bfloat16 for matrices (projections, LoRA, embedding, head), float32
    for the mixing vectors, decays, bonus and norms, which the fused kernels read in float32."""
    if device.type != "cuda":
        return torch.float32
    matrix = (key.endswith(".weight") and tensor.dim() == 2) or key.endswith(LOW_RANK)
    return torch.bfloat16 if matrix else torch.float32


def build_model(checkpoint: Checkpoint, device: str | torch.device = "cpu") -> RWKV6 | RWKV7:
    """An RWKV6 holding the checkpoint's weights on ``device``; a mismatch names the keys.

    The model is built on the meta device (no allocation, no random init) and each tensor goes
    once from the (memory-mapped) file to its device, cast there: no float32 copy on the host.
    """
    device = torch.device(device)
    version = getattr(checkpoint.config, "version", 6)
    # (not `with torch.device(...)`: that imports torch._dynamo, seconds)
    model = (RWKV7 if version == 7 else RWKV6)(checkpoint.config, device="meta")
    expected = dict(model.state_dict())
    state = {}
    for key, tensor in checkpoint.state.items():
        if key.endswith("att.time_faaaa"):  # some exports store it as [H, N, 1] or flat
            tensor = tensor.reshape(checkpoint.config.num_heads, checkpoint.config.head_size)
        if version == 7 and re.match(r"blocks\.0\.att\.v[012]$", key):
            continue  # x070 reads block 0's v as v_first; its value-residual weights are never used
        if version == 7 and key in expected and tensor.shape != expected[key].shape \
                and tensor.numel() == expected[key].numel() and sum(d > 1 for d in expected[key].shape) <= 1:
            tensor = tensor.reshape(expected[key].shape)  # vectors stored flat ([C]) or as [1, 1, C]
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            raise LayerprobeError(f"{checkpoint.source}: size mismatch for {key}: the checkpoint has "
                                  f"{tuple(tensor.shape)}, an RWKV-{version} of this config needs {tuple(expected[key].shape)}")
        value = tensor.to(device).to(parameter_dtype(key, tensor, device))
        if value.untyped_storage().nbytes() > 2 * value.nbytes and value.numel() < 2**20:
            value = value.clone()  # a small view must not keep a streamed file's whole buffer alive
        state[key] = value
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise LayerprobeError(f"{checkpoint.source}: missing {len(missing)} weight(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        raise LayerprobeError(f"{checkpoint.source}: {len(unexpected)} unknown weight(s), e.g. {', '.join(unexpected[:3])}; "
                              f"not RWKV-{version} ({'x070' if version == 7 else 'x060'})?")
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)
