"""Opening an MLflow store: the local SQLite default, a tracking server, and the errors of both.

MLflow 3 puts its plain file store in maintenance mode and recommends a database backend; SQLite
(``sqlite:///<tracking.dir>/mlflow.db``) needs no server. Creating that database runs MLflow's schema
migrations, which race when several processes do it at once (a half-migrated database breaks every
later run), so creation is serialised with a file lock beside the database. Artifacts of locally
created experiments go to ``<tracking.dir>/artifacts/<experiment>/``, so everything stays there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from framework.errors import LayerprobeError, storage_failure

LOCK_TIMEOUT_SECONDS = 300


@dataclass
class MLflowOptions:
    uri: str | None = None  # an MLflow tracking URI (http://127.0.0.1:5000, postgresql://…); null = SQLite under dir
    dir: str = "mlruns"  # the local store: mlflow.db and artifacts/ (and, by default, the token cache and Hydra's logs)
    experiment: str = "layerprobe"
    system_metrics: bool = False  # CPU, memory, disk, network (and GPU, with nvidia-ml-py) while a job runs
    http_timeout: int = 10  # seconds per request to a tracking server (MLflow's default: 120)
    http_retries: int = 2  # retries of a failed request (MLflow's default: 7, with backoff: minutes per call)


def local_folder(options: MLflowOptions) -> Path:
    try:
        return Path(options.dir or "mlruns").expanduser().resolve()
    except (RuntimeError, OSError) as error:  # a symlink loop (RuntimeError before Python 3.13, OSError ELOOP after)
        raise LayerprobeError(f"tracking.dir={options.dir}: cannot resolve it ({error}); point tracking.dir at a real folder") from None


def tracking_uri(options: MLflowOptions) -> str:
    """The configured URI, or SQLite under ``tracking.dir`` (created if needed, checked writable)."""
    if options.uri:
        return str(options.uri)
    folder = local_folder(options)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LayerprobeError(f"tracking.dir={options.dir}: cannot create it ({error.strerror}); "
                              "set tracking.dir to a writable folder or tracking.uri to an MLflow server") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LayerprobeError(f"tracking.dir={options.dir} is not writable; set tracking.dir to a writable folder "
                              "or tracking.uri to an MLflow server")
    return f"sqlite:///{folder / 'mlflow.db'}"


def check_server(uri: str, timeout: float = 10.0) -> None:
    """One request to the server's /health, so an unreachable URI is one line, not minutes of retries."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as error:
        raise LayerprobeError(f"tracking.uri={uri}: the server answered {error.code} {error.reason} at /health; "
                              "is it an MLflow tracking server?") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise LayerprobeError(f"tracking.uri={uri} is unreachable ({reason}); start the server (mlflow server "
                              "--host 127.0.0.1 --port …) or fix the URI") from None


@functools.lru_cache(maxsize=8)
def open_store(uri: str, experiment: str, artifact_folder: str | None):
    """``(client, experiment_id)`` for ``uri``; the experiment is created if missing (race-safe)."""
    import logging

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    # MLflow logs every database error with its traceback before raising it; layerprobe says each
    # one it can name (a full disk, a read-only store) in one line, and re-raises the rest.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    try:
        if uri.startswith("sqlite:///"):
            from filelock import FileLock, Timeout

            database = Path(uri.removeprefix("sqlite:///"))
            try:
                with FileLock(str(database) + ".lock", timeout=LOCK_TIMEOUT_SECONDS):
                    new = not database.exists()
                    try:
                        templated = new and _copy_empty_store(database)
                        client = MlflowClient(uri)
                        if templated:
                            _claim_default_experiment(client, database)
                        elif new:
                            _keep_empty_store(database)
                        found = _experiment_id(client, experiment, artifact_folder)
                        if new:
                            _hide_default_experiment(client)
                        return client, found
                    except Exception as error:
                        failure = storage_failure(error)
                        if failure is None:
                            raise
                        if new:  # a half-migrated database would break every later run: never leave one
                            database.unlink(missing_ok=True)
                        raise LayerprobeError(f"{database}: cannot write the MLflow store: {failure}; free space there "
                                              "or set tracking.dir/tracking.uri elsewhere") from None
            except Timeout:
                raise LayerprobeError(f"{database}: another process held its creation lock for {LOCK_TIMEOUT_SECONDS} s; "
                                      f"remove {database}.lock if no layerprobe process is running") from None
            except OSError as error:  # a read-only filesystem, a missing folder, no permission
                raise LayerprobeError(f"{database}: cannot open it for writing ({error.strerror or error}); "
                                      "set tracking.uri to a writable location or an MLflow server") from None
        client = MlflowClient(uri)
        return client, _experiment_id(client, experiment, artifact_folder)
    except MlflowException as error:
        raise LayerprobeError(f"MLflow store {uri}: {(str(error).splitlines() or [''])[0][:300]}") from None


def empty_store_template() -> Path:
    """Where a new, empty MLflow SQLite store of this MLflow version is kept (one per machine and user).

    Creating a store runs MLflow's ~60 schema migrations (1–2 s, paid by every sweep into a new
    tracking.dir and by most tests); a copy of an empty, migrated store is the same database in
    milliseconds. In ``$LAYERPROBE_CACHE_DIR``, default ``$XDG_CACHE_HOME/layerprobe`` (``~/.cache/layerprobe``).
    """
    import mlflow

    folder = os.environ.get("LAYERPROBE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "layerprobe"
    return Path(folder).expanduser() / f"mlflow-{mlflow.__version__}-empty.db"


def _empty_store_is_sound(path: Path) -> bool:
    """A migrated store with MLflow's Default experiment and nothing else: anything else is not used."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return (db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
                    and db.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
                    and db.execute("SELECT experiment_id, name FROM experiments").fetchall() == [(0, "Default")]
                    and db.execute("SELECT count(*) FROM runs").fetchone() == (0,))
    except sqlite3.Error:
        return False


def _copy_empty_store(database: Path) -> bool:
    """Start a new store as a copy of the empty template (True), when a sound one exists."""
    import shutil

    template = empty_store_template()
    if not template.is_file():
        return False
    if not _empty_store_is_sound(template):
        template.unlink(missing_ok=True)  # damaged or of another shape: made again from the next new store
        return False
    temporary = database.with_name(f".{database.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(template, temporary)
        os.replace(temporary, database)
    except OSError as error:  # a full or read-only disk: said of the store being made, not of the template
        raise OSError(error.errno, error.strerror, str(database)) from error
    finally:
        temporary.unlink(missing_ok=True)
    return True


def _claim_default_experiment(client, database: Path) -> None:
    """The copied store's Default experiment, as MLflow would have created it here and now: its
    artifact location under this store's artifact root, its times now."""
    import sqlite3
    import time

    store = client._tracking_client.store
    location = store._get_artifact_location(0) if hasattr(store, "_get_artifact_location") else None
    now = int(time.time() * 1000)
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        if location is not None:
            db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (location,))
        db.execute("UPDATE experiments SET creation_time = ?, last_update_time = ? WHERE experiment_id = 0", (now, now))


def _keep_empty_store(database: Path) -> None:
    """Keep a copy of a store MLflow just created (migrated, nothing in it yet) as the template."""
    import shutil

    template = empty_store_template()
    temporary = template.with_name(f".{template.name}.{os.getpid()}.tmp")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(database, temporary)
        if _empty_store_is_sound(temporary):
            os.replace(temporary, template)
    except OSError:  # no cache folder to write: every new store migrates, as without the template
        pass
    finally:
        temporary.unlink(missing_ok=True)


def _hide_default_experiment(client) -> None:
    """A store layerprobe created shows its own experiment only: MLflow's empty ``Default`` (id 0,
    which every store must hold) is marked deleted, so its UI does not list it."""
    from mlflow.exceptions import MlflowException

    try:
        if client.get_experiment("0").name == "Default" and not client.search_runs(["0"], max_results=1):
            client.delete_experiment("0")
    except MlflowException:
        pass


def _experiment_id(client, name: str, artifact_folder: str | None) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise LayerprobeError(f"MLflow experiment '{name}' is deleted; restore it (mlflow experiments restore) "
                                  "or set tracking.experiment to another name")
        return found.experiment_id
    location = (Path(artifact_folder) / name).as_uri() if artifact_folder else None
    try:  # an experiment of the machine-learning kind: MLflow's UI would otherwise open it in its GenAI mode
        return client.create_experiment(name, artifact_location=location,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except MlflowException:
        found = client.get_experiment_by_name(name)  # another process created it at the same moment
        if found is None:
            raise
        return found.experiment_id


def bound_server_retries(options: MLflowOptions) -> None:
    """A gone server costs seconds, not minutes: MLflow's retries, bounded (unless set in the environment)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(options.http_timeout)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(int(options.http_retries)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def store_for(options: MLflowOptions):
    uri = tracking_uri(options)
    if uri.startswith(("http://", "https://")):
        bound_server_retries(options)
    artifacts = None if options.uri else str(local_folder(options) / "artifacts")
    return open_store(uri, str(options.experiment or "layerprobe"), artifacts)
