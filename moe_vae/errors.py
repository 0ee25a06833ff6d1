"""The project's user-facing error: bad input (config, data, paths, arguments).

The CLI prints its message as one line and exits with status 2; any other exception is a bug and
keeps its traceback.
"""


class MoeVaeError(ValueError):
    """Bad input from the user; the message names the culprit and what was expected."""
