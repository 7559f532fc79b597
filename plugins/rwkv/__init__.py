"""RWKV-6 ("Finch") encoder: own PyTorch model, HF and BlinkDL checkpoints, Triton WKV on CUDA."""

from framework.hookspecs import hookimpl
from plugins.rwkv.options import RWKVOptions


def rwkv_encoder(options: RWKVOptions):
    """The encoder, its model code (torch, Triton) imported only when a job builds one."""
    from plugins.rwkv.encoder import RWKVEncoder

    return RWKVEncoder(options)


@hookimpl
def register_encoders(register):
    register("rwkv", rwkv_encoder, RWKVOptions)
