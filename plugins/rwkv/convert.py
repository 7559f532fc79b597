"""Convert an RWKV checkpoint once to safetensors, which loads memory-mapped and never runs code.

    python -m plugins.rwkv.convert IN.pth OUT.safetensors

``IN`` may be a BlinkDL ``.pth`` in PyTorch's legacy (non-zip) or zip format, or a
``pytorch_model.bin``; it is read with ``torch.load(weights_only=True)``, which accepts tensors
only. Key names are kept, so the result loads wherever the original did (``encoder.model=OUT``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def convert(source: Path, target: Path) -> int:
    from safetensors.torch import save_file

    state = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source}: not a state dict of tensors")
    # safetensors refuses tensors that share memory; each gets its own contiguous copy.
    save_file({key: value.contiguous().clone() for key, value in state.items()}, str(target))
    return len(state)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    if args.target.suffix != ".safetensors":
        parser.error("the target must end in .safetensors")
    try:
        count = convert(args.source, args.target)
    except Exception as error:  # unreadable file: one line, no traceback
        print(f"layerprobe: error: cannot convert {args.source}: {type(error).__name__}: {str(error)[:200]}", file=sys.stderr)
        raise SystemExit(2)
    print(f"{args.target}: {count} tensors")


if __name__ == "__main__":
    main()
