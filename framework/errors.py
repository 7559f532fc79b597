"""The one exception type that reaches the user as a single line."""


class LayerprobeError(Exception):
    """Bad input from the user (config, files, plugin names, layers).

    Raised where the input enters; the CLI prints ``str(error)`` on one line and exits non-zero,
    without a traceback. The message names the problem and the fix.
    """
