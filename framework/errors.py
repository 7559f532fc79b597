"""The one exception type that reaches the user as a single line."""

import errno


class LayerprobeError(Exception):
    """Bad input from the user (config, files, plugin names, layers).

    Raised where the input enters; the CLI prints ``str(error)`` on one line and exits non-zero,
    without a traceback. The message names the problem and the fix.
    """

    # The config settings (group or key prefixes) the error comes from, when the harness knows
    # them: an error whose settings a sweep does not vary recurs in every job of that sweep.
    settings: tuple[str, ...] | None = None


class SweepStopped(BaseException):
    """Raised in the sweep's driver when every remaining job would fail the same way.

    A BaseException, so Hydra's launchers (which record ``Exception`` as a failed job and go on)
    let it through to ``framework.__main__``, which ends the sweep and exits 2.
    """


_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                   errno.EROFS: "a read-only file system", errno.EFBIG: "the file-size limit was reached"}


def storage_failure(error: BaseException) -> str | None:
    """What a failed write says about the storage under it (a full disk, a read-only mount), with the
    path where the error names one; None for any other failure. Follows the exception's causes, since
    libraries (SQLAlchemy, MLflow) wrap the OSError or sqlite3 error that says it."""
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in _STORAGE_ERRNOS:
            return _STORAGE_ERRNOS[seen.errno] + (f" (writing {seen.filename})" if seen.filename else "")
        text = str(seen).lower()
        if "database or disk is full" in text:
            return "the database's disk is full"
        if "readonly database" in text or "read-only file system" in text:
            return "the database is on a read-only file system"
        if "no space left on device" in text:
            return "no space left on the device"
        seen = seen.__cause__ or seen.__context__
    return None
