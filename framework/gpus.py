"""One GPU per worker process of a sweep, on any launcher (joblib, submitit_local, Ray, basic).

Each worker claims the first GPU of the sweep's list that no other live worker holds: an exclusive
lock on ``<sweep dir>/gpus/gpu-<id>.lock``, held while the process lives and released by the OS when
it ends, however it ends (so a killed worker's GPU goes to the next one). The claim lasts for the
worker's life, so the encoder weights it loaded stay on its GPU for every later job it runs. With
more workers than GPUs the extra ones share, job n on GPU n mod count. A launcher that hands each
task its own GPU (Ray's ``num_gpus=1``, SLURM's ``gpus_per_task``) leaves one device visible: that
one is used. ``gpus`` (config) chooses: null = every visible GPU, N = the first N, a list = those ids.
``LAYERPROBE_VISIBLE_GPUS=0,1,…`` stands in for the visible devices (tests, fake device lists).
"""

from __future__ import annotations

import os
from pathlib import Path

from framework.errors import LayerprobeError

FAKE_DEVICES = "LAYERPROBE_VISIBLE_GPUS"
_CLAIMED: dict[str, tuple[int, object]] = {}  # sweep dir → (GPU, its open lock file), for this process


def visible_gpus() -> list[int]:
    fake = os.environ.get(FAKE_DEVICES)
    if fake is not None:
        return [int(part) for part in fake.split(",") if part.strip()]
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def checked_option(option):
    """``gpus`` as given: null, a positive count, or a list of GPU ids; anything else is a one-line error."""
    if option is None:
        return None
    usage = f"gpus={option}: give a number of GPUs (gpus=2), a list of GPU ids (gpus=[0,2]) or null (every visible one)"
    if isinstance(option, bool) or isinstance(option, (str, float)):
        raise LayerprobeError(usage)
    if isinstance(option, int):
        return option
    try:
        ids = list(option)
    except TypeError:
        raise LayerprobeError(usage) from None
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise LayerprobeError(usage)
    return ids


def chosen_gpus(option, visible: list[int]) -> list[int]:
    """The GPUs a sweep uses, from the ``gpus`` option (checked against what is visible)."""
    option = checked_option(option)
    if option is None:
        return visible
    if isinstance(option, int):
        if option < 1 or option > len(visible):
            raise LayerprobeError(f"gpus={option}: {len(visible)} GPU(s) are visible; use 1..{len(visible)} or null")
        return visible[:option]
    missing = [i for i in option if i not in visible]
    if missing:
        raise LayerprobeError(f"gpus={option}: GPU(s) {missing} are not visible (visible: {visible})")
    return option


def claim_gpu(sweep_dir: str, gpus: list[int]) -> int | None:
    """This worker's GPU for the sweep in ``sweep_dir``: one no other live worker holds, else None."""
    import fcntl

    if sweep_dir in _CLAIMED:
        return _CLAIMED[sweep_dir][0]
    folder = Path(sweep_dir) / "gpus"
    folder.mkdir(parents=True, exist_ok=True)
    for gpu in gpus:
        handle = open(folder / f"gpu-{gpu}.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _CLAIMED[sweep_dir] = (gpu, handle)
        return gpu
    return None


def assign_gpu(option, sweep_dir: str | None, number: int | None) -> int | None:
    """Pick this job's GPU (and make it torch's current device); None without GPUs."""
    checked_option(option)  # a malformed option is said on any machine, with GPUs or not
    visible = visible_gpus()
    if not visible:
        return None
    gpus = chosen_gpus(option, visible)
    if len(gpus) == 1:
        gpu = gpus[0]
    else:
        gpu = claim_gpu(sweep_dir, gpus) if sweep_dir is not None else None
        if gpu is None:  # more workers than GPUs (or no sweep folder): shared, round robin by job
            gpu = gpus[(number or 0) % len(gpus)]
    if os.environ.get(FAKE_DEVICES) is None:
        import torch

        torch.cuda.set_device(gpu)
    return gpu
