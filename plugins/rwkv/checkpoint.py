"""Load RWKV-6 weights from a Hugging Face folder (or hub id) or a BlinkDL ``.pth``, shapes inferred.

Both layouts are turned into BlinkDL's key names, which ``plugins.rwkv.model.RWKV6`` uses.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from framework.errors import LayerprobeError
from plugins.rwkv.model import RWKV6, RWKV6Config

HF_RENAMES = ((r"^rwkv\.", ""), (r"^embeddings\.", "emb."), (r"\.pre_ln\.", ".ln0."),
              (r"\.attention\.", ".att."), (r"\.feed_forward\.", ".ffn."))
HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                "pytorch_model.bin.index.json", "*.txt"]


@dataclass
class Checkpoint:
    config: RWKV6Config
    state: dict[str, torch.Tensor]
    source: str


def load_checkpoint(model: str, revision: str | None = None) -> Checkpoint:
    """Weights from a local folder, a local ``.pth`` file, or a hub id (downloaded when online)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return _from_hf_folder(path)
    if path.is_file():
        return _from_blinkdl_file(path)
    if model.startswith((".", "/", "~")) or model.endswith((".pth", ".pt", ".safetensors")) or model.count("/") != 1:
        raise LayerprobeError(f"encoder.model={model}: no such file or folder; give an RWKV-6 Hugging Face folder, "
                              "a BlinkDL .pth file, or a hub id such as RWKV/v6-Finch-1B6-HF")
    return _from_hf_folder(_download(model, revision), f"hub:{model}" + (f"@{revision}" if revision else ""))


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as error:  # offline, unknown repo, gated repo: many exception types
        first = (str(error).splitlines() or [""])[0][:200]
        raise LayerprobeError(f"encoder.model={repo_id}: could not fetch it from the Hugging Face hub "
                              f"({type(error).__name__}: {first}); offline? point encoder.model at a local folder or .pth") from None


def _from_hf_folder(folder: Path, source: str | None = None) -> Checkpoint:
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
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(_read_tensors(file))
    renamed = {}
    for key, tensor in state.items():
        for pattern, replacement in HF_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = tensor
    divisor = int(hf.get("head_size_divisor", 8))
    config = infer_config(renamed, str(folder), head_size_divisor=divisor, layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)))
    expected = {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_layers,
                "vocab_size": config.vocab_size, "head_size": config.head_size}
    for key, value in expected.items():
        if key in hf and hf[key] is not None and int(hf[key]) != value:
            raise LayerprobeError(f"{config_file}: {key}={hf[key]} but the weights say {value}; the folder is inconsistent")
    return Checkpoint(config, renamed, source or f"folder:{folder.resolve()}")


def _from_blinkdl_file(path: Path) -> Checkpoint:
    state = _read_tensors(path)
    return Checkpoint(infer_config(state, str(path)), state, f"file:{path.resolve()}")


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


def build_model(checkpoint: Checkpoint) -> RWKV6:
    """An RWKV6 holding the checkpoint's weights (float32, CPU); a mismatch names the keys."""
    model = RWKV6(checkpoint.config)
    state = dict(checkpoint.state)
    faaaa = [k for k in state if k.endswith("att.time_faaaa")]
    for key in faaaa:  # some exports store it as [H, N, 1] or flat
        state[key] = state[key].reshape(checkpoint.config.num_heads, checkpoint.config.head_size)
    try:
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    except RuntimeError as error:
        shape_line = next((l.strip() for l in str(error).splitlines() if "size mismatch" in l), str(error)[:200])
        raise LayerprobeError(f"{checkpoint.source}: {shape_line}") from None
    if missing:
        raise LayerprobeError(f"{checkpoint.source}: missing {len(missing)} weight(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        raise LayerprobeError(f"{checkpoint.source}: {len(unexpected)} unknown weight(s), e.g. {', '.join(unexpected[:3])}; not RWKV-6 (x060)?")
    return model.eval().requires_grad_(False)
