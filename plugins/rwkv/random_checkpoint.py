"""Random RWKV-6 and RWKV-7 checkpoints in BlinkDL or Hugging Face layout, for tests and benchmarks.

    python -m plugins.rwkv.random_checkpoint OUT.pth [--layers 4 --hidden 128 --ffn 448 --vocab 65536]
    python -m plugins.rwkv.random_checkpoint OUT_DIR --hf ...   # config.json + model.safetensors
    python -m plugins.rwkv.random_checkpoint --version 7 OUT.pth [--deep-embed] ...   # x070 (ffn default 4 × hidden)
    python -m plugins.rwkv.random_checkpoint --version 7 OUT_DIR --hf ...   # fla-hub's RWKV-7 layout

The G1 1.5B shape of RWKV-7 is --version 7 --layers 24 --hidden 2048 --vocab 65536.

Values are scaled like a trained model's (decays in a useful range, unit-ish layer norms), so
hidden states are not degenerate; the 1B6 shape is --layers 24 --hidden 2048 --ffn 7168 --vocab 65536.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def _samplers(seed: int, device: str):
    """normal(*shape, std) and uniform(low, high, *shape) drawing from one seeded generator, in call order."""
    g = torch.Generator(device).manual_seed(seed)

    def normal(*shape, std=1.0):
        return torch.randn(*shape, generator=g, device=device) * std

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=g, device=device)

    return normal, uniform


def _block_norms(b: str, index: int, C: int, normal, uniform) -> dict[str, torch.Tensor]:
    """ln0 (block 0), ln1, ln2 of a block: unit-ish scales, small biases (drawn in this order)."""
    norms = {}
    for ln in (("ln0", "ln1", "ln2") if index == 0 else ("ln1", "ln2")):
        norms[b + f"{ln}.weight"], norms[b + f"{ln}.bias"] = uniform(0.8, 1.2, C), normal(C, std=0.05)
    return norms


def random_state(layers: int, hidden: int, ffn: int, vocab: int, head_size: int = 64, seed: int = 0,
                 mix_rank: int = 32, decay_rank: int = 64, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A BlinkDL-layout RWKV-6 state dict (the shapes the official runtime expects), made on ``device``."""
    normal, uniform = _samplers(seed, device)
    C, H = hidden, hidden // head_size

    state = {"emb.weight": normal(vocab, C, std=1.0)}
    for i in range(layers):
        b = f"blocks.{i}."
        state.update(_block_norms(b, i, C, normal, uniform))
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


def lora_ranks7(hidden: int) -> dict[str, int]:
    """The low-rank sizes BlinkDL's x070 training code gives a model of this width (G1 1.5B: 96, 96, 64, 256)."""
    def rank(factor, power):
        return max(32, int(round(factor * hidden ** power / 32) * 32))

    return {"decay": rank(1.8, 0.5), "a": rank(1.8, 0.5), "v": rank(1.3, 0.5), "gate": rank(0.6, 0.8)}


def random_state7(layers: int, hidden: int, ffn: int | None, vocab: int, head_size: int = 64, seed: int = 0,
                  deep_embed: bool = False, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A BlinkDL-layout RWKV-7 (x070) state dict, as the official runtime reads it (block 0 has no
    v0/v1/v2 use, but carries them as trained checkpoints do)."""
    normal, uniform = _samplers(seed, device)
    C, H, F_ = hidden, hidden // head_size, ffn or 4 * hidden
    ranks = lora_ranks7(C)

    state = {"emb.weight": normal(vocab, C, std=1.0)}
    for i in range(layers):
        b = f"blocks.{i}."
        state.update(_block_norms(b, i, C, normal, uniform))
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            state[b + f"att.{name}"] = uniform(0, 1, 1, 1, C)
        state[b + "att.w0"] = uniform(-3.0, 1.0, 1, 1, C)
        state[b + "att.a0"] = normal(1, 1, C, std=0.5)
        state[b + "att.v0"] = uniform(0.5, 1.5, 1, 1, C)
        for name, rank in (("w", ranks["decay"]), ("a", ranks["a"]), ("v", ranks["v"]), ("g", ranks["gate"])):
            state[b + f"att.{name}1"] = normal(C, rank, std=0.5 / math.sqrt(C))
            state[b + f"att.{name}2"] = normal(rank, C, std=0.5 / math.sqrt(rank))
        state[b + "att.k_k"] = uniform(0.7, 1.0, 1, 1, C)
        state[b + "att.k_a"] = uniform(0.8, 1.2, 1, 1, C)
        state[b + "att.r_k"] = normal(H, head_size, std=0.3)
        for name in ("receptance", "key", "value"):
            state[b + f"att.{name}.weight"] = normal(C, C, std=1 / math.sqrt(C))
        state[b + "att.output.weight"] = normal(C, C, std=0.5 / math.sqrt(C))
        state[b + "att.ln_x.weight"], state[b + "att.ln_x.bias"] = uniform(0.8, 1.2, C), normal(C, std=0.05)
        state[b + "ffn.x_k"] = uniform(0, 1, 1, 1, C)
        state[b + "ffn.key.weight"] = normal(F_, C, std=1 / math.sqrt(C))
        state[b + "ffn.value.weight"] = normal(C, F_, std=0.5 / math.sqrt(F_))
        if deep_embed:
            state[b + "ffn.s1"] = normal(C, 32, std=1 / math.sqrt(C))
            state[b + "ffn.s2"] = normal(32, F_, std=0.1 / math.sqrt(32))
            state[b + "ffn.s0"] = uniform(0.8, 1.2, F_)
            state[b + "ffn.s_emb.weight"] = normal(vocab, 32 * 32, std=0.2)
            state[b + "ffn.s_emb_x.weight"] = normal(32 * 32, C, std=0.2 / math.sqrt(C))
    state["ln_out.weight"], state["ln_out.bias"] = uniform(0.8, 1.2, C), normal(C, std=0.05)
    state["head.weight"] = normal(vocab, C, std=1 / math.sqrt(C))
    return state


def to_fla7_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BlinkDL x070 names → fla-hub's RWKV-7 Hugging Face names (``plugins.rwkv.checkpoint.FLA7_NAMES``
    is the inverse); block 0's v0/v1/v2, which x070 never uses, have no place there."""
    from plugins.rwkv.checkpoint import blinkdl7_to_fla

    return blinkdl7_to_fla(state)


def write_fla7_folder(state: dict[str, torch.Tensor], folder: Path, head_size: int = 64) -> Path:
    from safetensors.torch import save_file

    vocab, hidden = state["emb.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    config = {"architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", "hidden_size": hidden, "head_dim": head_size,
              "num_hidden_layers": layers, "intermediate_size": state["blocks.0.ffn.key.weight"].shape[0],
              "decay_low_rank_dim": state["blocks.0.att.w1"].shape[1], "a_low_rank_dim": state["blocks.0.att.a1"].shape[1],
              "v_low_rank_dim": state["blocks.0.att.v1"].shape[1], "gate_low_rank_dim": state["blocks.0.att.g1"].shape[1],
              "norm_eps": 1e-5, "vocab_size": vocab}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in to_fla7_layout(state).items()}, str(folder / "model.safetensors"))
    return folder


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
    parser.add_argument("--version", type=int, choices=(6, 7), default=6)
    parser.add_argument("--deep-embed", action="store_true", help="RWKV-7: the DeepEmbed variant (per-token FFN scales)")
    args = parser.parse_args()
    if args.version == 7:
        ffn = None if args.ffn == parser.get_default("ffn") else args.ffn
        state = random_state7(args.layers, args.hidden, ffn, args.vocab, seed=args.seed, deep_embed=args.deep_embed)
    else:
        state = random_state(args.layers, args.hidden, args.ffn, args.vocab, seed=args.seed)
    if args.hf:
        (write_fla7_folder if args.version == 7 else write_hf_folder)(state, args.out)
    elif args.out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(args.out))
    else:
        torch.save(state, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
