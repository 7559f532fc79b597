"""Token states shared across the jobs of a sweep and across sweeps.

Keyed by the encoder's fingerprint (weights, config, tokenizer), the layer index and the exact
sentences encoded (so the dataset's rows and split are in the key). Held in memory for the jobs of
one process (Hydra's basic launcher) and on disk (``cache.dir``) for other processes and later
sweeps, with a size bound that evicts the least recently used files. An encoder that can continue
from a shallower layer's states (``resume``) starts from the deepest cached one below the layer
asked for, instead of from the embeddings.

Several worker processes (joblib, SLURM, Ray) share the folder: files are written to a temporary
name and renamed (a reader sees a whole file or none), a per-key file lock makes a second worker
that needs the same states wait for the first instead of computing them again, and a damaged or
truncated file is reported, deleted and recomputed, never fatal.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from framework.data import Layer, TokenStates

MEMORY_BYTES = 4 * 2**30
# Writing a float32 state file and reading it back runs at about this rate here: states that were
# faster to compute than that (a GPU encode) are kept in memory for this process only, so the disk
# holds what is expensive to recompute, and pooled vectors (small) are always written.
DISK_BYTES_PER_SECOND = 1e9


def timed(batches: Iterable[TokenStates]) -> Iterator[tuple[TokenStates | None, float]]:
    """Each batch with the seconds the consumer waited for it (its GPU work included), not the
    consumer's own time. Only the consumer's stream is waited for: an encoder that already
    computes the next batch on a stream of its own (as rwkv does) keeps doing so meanwhile.

    Ends with ``(None, seconds)``: the last call, which may still do work (e.g. write a cache file).
    """
    iterator = iter(batches)
    while True:
        started = time.perf_counter()
        batch = next(iterator, None)
        if batch is not None and batch.states.is_cuda:
            torch.cuda.current_stream(batch.states.device).synchronize()
        yield batch, time.perf_counter() - started
        if batch is None:
            return


class TokenStateCache:
    def __init__(self, folder: str | None, max_gb: float):
        self.folder = Path(folder).expanduser() if folder else None
        self.max_bytes = int(max_gb * 2**30)
        self.memory: OrderedDict[str, list[TokenStates]] = OrderedDict()
        self.damaged = 0  # files found unreadable (and recomputed)
        self.cost: dict[str, float] = {}  # key → seconds it took to compute (stored with the states)
        self.written: set[Path] = set()  # files this process wrote: evicting one means the cache is too small
        self.evicted_own = 0
        self.kept_in_memory = 0  # entries not written to disk (cheaper to recompute than to read back)
        self.unwritable: str | None = None  # why the folder took no more writes (a full disk): memory only from then on

    @staticmethod
    def key(fingerprint: str, layer_index: int | None, sentences: Sequence[str]) -> str:
        digest = hashlib.sha256(f"{fingerprint}|{layer_index}|{len(sentences)}".encode())
        for sentence in sentences:
            digest.update(sentence.encode("utf-8", "surrogatepass") + b"\0")
        return digest.hexdigest()[:32]

    def _path(self, key: str) -> Path | None:
        return self.folder / f"{key}.pt" if self.folder else None

    def has(self, key: str) -> bool:
        path = self._path(key)
        return key in self.memory or bool(path and path.is_file())

    def get(self, key: str) -> list[TokenStates] | None:
        if key in self.memory:
            self.memory.move_to_end(key)
            return self.memory[key]
        path = self._path(key)
        if not (path and path.is_file()):
            return None
        try:  # weights_only: tensors and plain containers only, never code
            stored = _verified(torch.load(path, map_location="cpu", weights_only=True))
            batches = [TokenStates(b["states"], b["mask"], b["index"], Counter(b["counts"])) for b in stored["batches"]]
            if not batches:
                raise ValueError("the entry holds no states")
            if stored.get("encode_seconds") is not None:
                self.cost[key] = float(stored["encode_seconds"])
        except Exception as error:  # damaged, truncated or foreign: recompute, never fail the job
            self.damaged += 1
            print(f"layerprobe: warning: token-state cache file {path} is unreadable ({type(error).__name__}: "
                  f"{str(error)[:120]}); recomputing it", file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: evicted last
        self._remember(key, batches)
        return batches

    def put(self, key: str, batches: list[TokenStates], encode_seconds: float | None = None,
            compute_seconds: float | None = None) -> None:
        """Keep ``batches`` (and what computing them cost, so a later hit can report it).

        On disk only when computing them took longer than reading them back would: a GPU encode
        of a train split is faster than a read of its gigabytes of float32 states. ``compute_seconds``
        is what recomputing them would take now (a continued layer: only the blocks above its start);
        ``encode_seconds`` what producing them cost in all (stored, reported by later hits).
        """
        self._remember(key, batches)
        if encode_seconds is not None:
            self.cost[key] = encode_seconds
        recompute = encode_seconds if compute_seconds is None else compute_seconds
        if recompute is not None and recompute < sum(_size(b) for b in batches) / DISK_BYTES_PER_SECOND:
            self.kept_in_memory += 1
            return
        payload = {"batches": [{"states": b.states.float().cpu(), "mask": b.mask.cpu(), "index": b.sentence_index.cpu(),
                                "counts": dict(b.counts)} for b in batches],
                   "encode_seconds": encode_seconds}
        self._write(key, payload)

    def _write(self, key: str, payload: dict, prefix: str = "") -> None:
        """Write an entry whole or not at all. A folder that refuses writes (a full disk, a read-only
        mount) turns the cache into a memory-only one, said once: the job's result never depends on it."""
        path = self._path(prefix + key)
        if path is None or self.unwritable is not None:
            return
        temporary = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(handle)
            torch.save({**payload, "checksum": checksum(payload)}, temporary)
            os.replace(temporary, path)  # atomic: concurrent jobs never read half a file
        except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
            self._refuse_writes(path.parent, _said_plainly(error, path, payload))
            return
        finally:
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
        self.written.add(path)
        self._evict()

    # --- pooled vectors and fitted poolers: small entries keyed by what made them -------------------

    def get_entry(self, key: str, prefix: str) -> dict | None:
        """A stored dict of tensors and numbers (pooled vectors, a fitted pooler), or None."""
        path = self._path(prefix + key)
        if path is None or not path.is_file():
            return None
        try:  # weights_only: tensors and plain containers only, never code
            stored = _verified(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as error:
            self.damaged += 1
            print(f"layerprobe: warning: cache file {path} is unreadable ({type(error).__name__}: {str(error)[:120]}); "
                  "recomputing it", file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)
        return stored

    def put_entry(self, key: str, prefix: str, payload: dict) -> None:
        self._write(key, payload, prefix)

    def computing(self, key: str):
        """A lock held while the states of ``key`` are computed, across processes (no-op in memory only)."""
        if self.folder is None or self.unwritable is not None:
            return contextlib.nullcontext()
        from filelock import FileLock

        try:
            (self.folder / "locks").mkdir(parents=True, exist_ok=True)
        except OSError as error:
            self._refuse_writes(self.folder, error)
            return contextlib.nullcontext()
        return self._locked(FileLock(str(self.folder / "locks" / f"{key}.lock")))

    def _refuse_writes(self, folder: Path, error: Exception) -> None:
        self.unwritable = f"{type(error).__name__}: {str(error)[:160]}"
        print(f"layerprobe: warning: cannot write to the cache folder {folder} ({self.unwritable}); caching in memory "
              "only from here on (free space there, or set cache.dir elsewhere)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def _locked(self, lock):
        try:
            lock.acquire()
        except OSError as error:  # a read-only or full folder cannot hold the lock file: compute unlocked
            self._refuse_writes(self.folder, error)
            yield
            return
        try:
            yield
        finally:
            lock.release()

    def _remember(self, key: str, batches: list[TokenStates]) -> None:
        self.memory[key] = batches
        self.memory.move_to_end(key)
        while sum(_size(b) for v in self.memory.values() for b in v) > min(MEMORY_BYTES, self.max_bytes) and len(self.memory) > 1:
            self.memory.popitem(last=False)

    def _evict(self) -> None:
        sizes = {}
        for path in self.folder.glob("*.pt"):
            with contextlib.suppress(OSError):  # another process may evict the same file
                stat = path.stat()
                sizes[path] = (stat.st_mtime, stat.st_size)
        files = sorted(sizes, key=lambda p: sizes[p][0])
        total = sum(size for _, size in sizes.values())
        for path in files[:-1]:
            if total <= self.max_bytes:
                break
            total -= sizes[path][1]
            path.unlink(missing_ok=True)
            if path in self.written:  # this run wrote it: the same sweep, run again, would recompute it
                self.evicted_own += 1
                if self.evicted_own == 1:
                    print(f"layerprobe: warning: the token cache ({self.folder}) is full at cache.max_gb={self.max_bytes / 2**30:g}: "
                          "it evicts entries this run wrote, so running it again recomputes them; raise cache.max_gb",
                          file=sys.stderr, flush=True)


def _said_plainly(error: Exception, path: Path, payload: dict) -> Exception:
    """torch.save's failed write ("enforce fail at inline_container.cc") as what it was, when the
    folder has less room than the entry needs: a full disk."""
    if isinstance(error, OSError):
        return error
    need = sum(t.numel() * t.element_size() for t in _tensors(payload))
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(path.parent).free
        if free < need:
            return OSError(errno.ENOSPC, f"No space left on device ({free / 2**20:.1f} MiB free for an entry of "
                                         f"{need / 2**20:.1f} MiB)", str(path))
    return error


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def checksum(tree) -> str:
    """A digest of every tensor (dtype, shape, bytes) and value in a cache entry, in a fixed order:
    written with the entry, checked on every read, so bytes changed on disk are never read as states."""
    digest = hashlib.blake2b(digest_size=16)

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                digest.update(f"K{key!s}".encode())
                visit(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                visit(item)
        else:
            digest.update(f"V{value!r}".encode())

    visit(tree)
    return digest.hexdigest()


def _verified(stored) -> dict:
    if not isinstance(stored, dict):
        raise ValueError("not a layerprobe cache entry")
    written = stored.pop("checksum", None)
    if written is None:
        raise ValueError("no checksum (written by an older layerprobe)")
    if checksum(stored) != written:
        raise ValueError("checksum mismatch: its bytes changed after it was written")
    return stored


def _gpu_has_room(device, entry_bytes: float) -> bool:
    """Keep an entry on the GPU only while the GPU has room for four more like it."""
    free, _ = torch.cuda.mem_get_info(device)
    return free > 4 * entry_bytes


def _size(batch: TokenStates) -> int:
    return batch.states.numel() * batch.states.element_size()


class CachedEncoder:
    """Wraps an encoder; ``encode`` serves cached token states when it can.

    ``stats`` counts, per call, whether the layer was a hit, a miss, or resumed from a shallower
    cached layer (and which), for the run to log. ``last`` says where the states of the latest
    ``encode`` came from (``computed``, ``cache``, or ``continued`` from a shallower cached layer)
    and what producing them cost: ``encode_seconds`` is the computation's time even when the
    states were read from the cache (stored with them), ``read_seconds`` the time of the read.
    """

    def __init__(self, encoder, cache: TokenStateCache):
        self.encoder = encoder
        self.cache = cache
        self.stats: Counter = Counter()
        self.last: dict = {}

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode(self, sentences: Sequence[str], layer: Layer) -> Iterator[TokenStates]:
        fingerprint = self.encoder.fingerprint()
        key = self.cache.key(fingerprint, layer.index, sentences)
        started = time.perf_counter()
        batches = self._get(key)
        if batches is None:
            with self.cache.computing(key):
                started = time.perf_counter()
                batches = self._get(key)  # another worker may have computed it while this one waited
                if batches is None:
                    yield from self._compute(fingerprint, key, sentences, layer)
                    return
        self.stats["cache_hits"] += 1
        self.last = {"origin": "cache", "encode_seconds": self.cache.cost.get(key),
                     "read_seconds": time.perf_counter() - started}
        yield from batches

    def _get(self, key: str) -> list[TokenStates] | None:
        return self._counting_damage(self.cache.get, key)

    def entry(self, key: str, prefix: str) -> dict | None:
        """A pooled-vector or fitted-pooler entry, its damage counted in ``stats`` like token states'."""
        return self._counting_damage(self.cache.get_entry, key, prefix)

    def _counting_damage(self, read, *arguments):
        damaged = self.cache.damaged
        found = read(*arguments)
        if self.cache.damaged > damaged:
            self.stats["cache_damaged"] += self.cache.damaged - damaged
        return found

    def _compute(self, fingerprint: str, key: str, sentences: Sequence[str], layer: Layer) -> Iterator[TokenStates]:
        self.stats["cache_misses"] += 1
        started = time.perf_counter()
        source = self._resumable_source(fingerprint, layer, sentences)
        earlier = 0.0  # what the shallower layer's states cost, when continuing from them
        if source is not None:
            start, cached, earlier = source
            self.stats["cache_resumed"] += 1
            self.stats["cache_resumed_from_layer"] = start.index
            produced = (self.encoder.resume(batch, sentences, start, layer) for batch in cached)
        else:
            produced = self.encoder.encode(sentences, layer)
        kept, seconds = [], time.perf_counter() - started
        on_device = None  # GPU states stay on the GPU in memory when it has room (no copy out and back)
        for batch, spent in timed(produced):
            seconds += spent
            if batch is None:
                break
            if on_device is None:
                on_device = batch.states.is_cuda and _gpu_has_room(batch.states.device, len(sentences) * _size(batch) / len(batch.states))
            if on_device:
                kept.append(TokenStates(batch.states, batch.mask, batch.sentence_index.cpu(), batch.counts))
            else:
                kept.append(TokenStates(batch.states.float().cpu(), batch.mask.cpu(), batch.sentence_index.cpu(), batch.counts))
            yield batch
        self.last = {"origin": "continued" if source is not None else "computed", "encode_seconds": earlier + seconds,
                     "read_seconds": 0.0}
        in_memory = self.cache.kept_in_memory
        self.cache.put(key, kept, earlier + seconds, compute_seconds=seconds)
        if self.cache.kept_in_memory > in_memory:
            self.stats["cache_kept_in_memory"] += 1

    def _resumable_source(self, fingerprint: str, layer: Layer, sentences):
        from framework.stages import ResumableEncoder

        if not isinstance(self.encoder, ResumableEncoder) or layer.index is None:
            return None
        for index in range(layer.index - 1, -1, -1):
            start = self.encoder.resolve_layer(index)
            if not self.encoder.can_resume_from(start):
                continue
            key = self.cache.key(fingerprint, index, sentences)
            cached = self._get(key)
            if cached is not None:
                return start, cached, self.cache.cost.get(key, 0.0)
        return None
