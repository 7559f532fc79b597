"""RWKV-6 ("Finch") encoder: own PyTorch model, HF and BlinkDL checkpoints, Triton WKV on CUDA."""

from framework.hookspecs import hookimpl
from plugins.rwkv.encoder import RWKVEncoder, RWKVOptions


@hookimpl
def register_encoders(register):
    register("rwkv", RWKVEncoder, RWKVOptions)
