"""The one exception type that reaches the user as a single line."""


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
