"""Random RWKV-6 checkpoints in BlinkDL or Hugging Face layout, for tests and benchmarks.

    python -m plugins.rwkv.random_checkpoint OUT.pth [--layers 4 --hidden 128 --ffn 448 --vocab 65536]
    python -m plugins.rwkv.random_checkpoint OUT_DIR --hf ...   # config.json + model.safetensors

Values are scaled like a trained model's (decays in a useful range, unit-ish layer norms), so
hidden states are not degenerate; the 1B6 shape is --layers 24 --hidden 2048 --ffn 7168 --vocab 65536.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def random_state(layers: int, hidden: int, ffn: int, vocab: int, head_size: int = 64, seed: int = 0,
                 mix_rank: int = 32, decay_rank: int = 64, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A BlinkDL-layout RWKV-6 state dict (the shapes the official runtime expects), made on ``device``."""
    g = torch.Generator(device).manual_seed(seed)
    C, H = hidden, hidden // head_size

    def normal(*shape, std=1.0):
        return torch.randn(*shape, generator=g, device=device) * std

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=g, device=device)

    state = {"emb.weight": normal(vocab, C, std=1.0)}
    for i in range(layers):
        b = f"blocks.{i}."
        if i == 0:
            state[b + "ln0.weight"], state[b + "ln0.bias"] = uniform(0.8, 1.2, C), normal(C, std=0.05)
        for ln in ("ln1", "ln2"):
            state[b + f"{ln}.weight"], state[b + f"{ln}.bias"] = uniform(0.8, 1.2, C), normal(C, std=0.05)
        for name in "xwkvrg":
            state[b + f"att.time_maa_{name}"] = uniform(0, 1, 1, 1, C)
        state[b + "att.time_maa_w1"] = uniform(-0.05, 0.05, C, 5 * mix_rank)
        state[b + "att.time_maa_w2"] = uniform(-0.05, 0.05, 5, mix_rank, C)
        state[b + "att.time_decay"] = uniform(-6.0, -0.5, 1, 1, C)
        state[b + "att.time_decay_w1"] = uniform(-0.05, 0.05, C, decay_rank)
        state[b + "att.time_decay_w2"] = uniform(-0.05, 0.05, decay_rank, C)
        state[b + "att.time_faaaa"] = normal(H, head_size, std=0.3)
        for name in ("receptance", "key", "value", "gate"):
            state[b + f"att.{name}.weight"] = normal(C, C, std=1 / math.sqrt(C))
        state[b + "att.output.weight"] = normal(C, C, std=0.5 / math.sqrt(C))
        state[b + "att.ln_x.weight"], state[b + "att.ln_x.bias"] = uniform(0.8, 1.2, C), normal(C, std=0.05)
        state[b + "ffn.time_maa_k"], state[b + "ffn.time_maa_r"] = uniform(0, 1, 1, 1, C), uniform(0, 1, 1, 1, C)
        state[b + "ffn.key.weight"] = normal(ffn, C, std=1 / math.sqrt(C))
        state[b + "ffn.value.weight"] = normal(C, ffn, std=0.5 / math.sqrt(ffn))
        state[b + "ffn.receptance.weight"] = normal(C, C, std=1 / math.sqrt(C))
    state["ln_out.weight"], state["ln_out.bias"] = uniform(0.8, 1.2, C), normal(C, std=0.05)
    state["head.weight"] = normal(vocab, C, std=1 / math.sqrt(C))
    return state


def to_hf_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BlinkDL names → the Hugging Face RWKV-6 names (``rwkv.blocks.{i}.attention.*`` …)."""
    renamed = {}
    for key, tensor in state.items():
        if key == "head.weight":
            renamed[key] = tensor
            continue
        key = key.replace("emb.", "embeddings.").replace(".ln0.", ".pre_ln.").replace(".att.", ".attention.").replace(".ffn.", ".feed_forward.")
        renamed["rwkv." + key] = tensor
    return renamed


def hf_config(state: dict[str, torch.Tensor], head_size: int = 64) -> dict:
    vocab, hidden = state["emb.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    return {"architectures": ["Rwkv6ForCausalLM"], "model_type": "rwkv6", "hidden_size": hidden,
            "num_hidden_layers": layers, "attention_hidden_size": hidden, "head_size": head_size,
            "head_size_divisor": 8, "intermediate_size": state["blocks.0.ffn.key.weight"].shape[0],
            "layer_norm_epsilon": 1e-5, "rescale_every": 6, "vocab_size": vocab}


def write_hf_folder(state: dict[str, torch.Tensor], folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(state), indent=2))
    save_file({k: v.contiguous() for k, v in to_hf_layout(state).items()}, str(folder / "model.safetensors"))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=448)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf", action="store_true", help="write a Hugging Face folder instead of a .pth")
    args = parser.parse_args()
    state = random_state(args.layers, args.hidden, args.ffn, args.vocab, seed=args.seed)
    if args.hf:
        write_hf_folder(state, args.out)
    else:
        torch.save(state, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
