"""Shared fixtures: tiny GLUE folders, tiny word vectors, and a CLI runner with its own MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Without a GPU the fused RWKV kernels run in Triton's interpreter, which Triton reads when it is
# first imported, and other libraries import it early (sentence-transformers does, through
# transformers): so it is set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Per-user caches layerprobe keeps (the empty MLflow store it copies new stores from): inside the
# test session, not in the user's home.
if "LAYERPROBE_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["LAYERPROBE_CACHE_DIR"] = tempfile.mkdtemp(prefix="layerprobe-test-cache-")

REPO = Path(__file__).resolve().parent.parent
SHARED_GLUE = REPO.parent / "shared" / "data" / "glue"
needs_shared_data = pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="../shared/data/glue is not beside this checkout")

MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
# Paraphrases share words; non-paraphrases do not, so a word-vector model ranks them apart.
MRPC_ROWS = [
    ("1", "the cat sat on the mat", "a cat sat on a mat"),
    ("0", "stocks fell sharply today", "the cat sat on the mat"),
    ("1", "stocks fell sharply today", "stocks dropped sharply today"),
    ("0", "the dog barked", "stocks fell today"),
    ("1", "the dog barked loudly", "the dog barked"),
    ("0", "a cat sat", "markets rose"),
    ("1", '"quoted start never closed', "quoted start never closed"),
    ("0", "markets rose", "the dog barked loudly"),
]
WORDS = ["the", "a", "cat", "sat", "on", "mat", "stocks", "fell", "dropped", "sharply", "today",
         "dog", "barked", "loudly", "markets", "rose", "quoted", "start", "never", "closed", '"quoted']


def write_mrpc(folder: Path, rows=MRPC_ROWS, splits=("train.tsv", "dev.tsv")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in splits:
        lines = [MRPC_HEADER] + [f"{q}\t{i}\t{i + 100}\t{a}\t{b}" for i, (q, a, b) in enumerate(rows)]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_glove_text(path: Path, dim: int = 8, seed: int = 0) -> Path:
    """GloVe text format (no header), random vectors; 'cat'/'dog' etc. get distinct directions."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lines = [w + " " + " ".join(f"{x:.6f}" for x in rng.normal(size=dim)) for w in WORDS]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny_mrpc(tmp_path) -> Path:
    return write_mrpc(tmp_path / "MRPC")


@pytest.fixture
def tiny_vectors(tmp_path) -> Path:
    return write_glove_text(tmp_path / "vectors.txt")


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    store: Path

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(f"sqlite:///{self.store / 'mlflow.db'}")

    def runs(self, experiment: str = "layerprobe"):
        client = self.client()
        found = client.get_experiment_by_name(experiment)
        return [] if found is None else client.search_runs([found.experiment_id], max_results=1000)

    def tracker(self, experiment: str = "layerprobe"):
        """The MLflow tracker over this run's store, as ``python -m framework.report`` builds it."""
        from framework.plugins import registry

        return registry().build("tracker", {"name": "mlflow", "dir": str(self.store), "experiment": experiment})

    def parents(self, experiment: str = "layerprobe"):
        return [r for r in self.runs(experiment) if r.data.tags.get("layerprobe.sweep") == "true"]

    def children(self, parent, experiment: str = "layerprobe"):
        return [r for r in self.runs(experiment) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]

    @property
    def error_lines(self) -> list[str]:
        return [l for l in self.stderr.splitlines() if l.startswith("layerprobe:")]


def cli_command(store: Path, *args: str, env: dict | None = None) -> tuple[list[str], dict]:
    """argv and environment of ``python -m framework ARGS`` with its MLflow store in ``store``."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    if any(a.startswith("tracking=") and a != "tracking=mlflow" for a in overrides):  # a tracker without tracking.dir
        where = [f"hydra.run.dir={store}/run", f"hydra.sweep.dir={store}/sweep", f"cache.dir={store}/cache"]
    elif any(a.startswith(("tracking.dir=", "tracking.uri=")) for a in overrides):
        where = []
    else:
        where = [f"tracking.dir={store}"]
    return [sys.executable, "-m", "framework", *flags, *where, *overrides], environment


@pytest.fixture
def run_cli(tmp_path):
    """Run ``python -m framework ARGS`` in a subprocess, with the MLflow store under tmp_path."""
    store = tmp_path / "mlruns"

    def run(*args: str, env: dict | None = None, timeout: int = 300) -> CliResult:
        command, environment = cli_command(store, *args, env=env)
        done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)
        return CliResult(done.returncode, done.stdout, done.stderr, store)

    return run


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def testkit_site(tmp_path_factory) -> Path:
    """tests/plugins/layerprobe_testkit.py installed as pip would: module + dist-info entry point."""
    import shutil

    site = tmp_path_factory.mktemp("testkit-site")
    shutil.copy(REPO / "tests" / "plugins" / "layerprobe_testkit.py", site)
    info = site / "layerprobe_testkit-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: layerprobe-testkit\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[layerprobe]\ntestkit = layerprobe_testkit\n")
    return site


@pytest.fixture
def testkit_env(testkit_site) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(testkit_site), os.environ.get("PYTHONPATH", "")])}
