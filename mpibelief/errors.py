"""Errors that reach the user as one line, without a traceback.

Anything the user can fix (a config key, a data folder, a world size) raises a
subclass of :class:`UserError`; the entry point prints ``mpibelief: error: <msg>``
and ends the whole MPI job.  Every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


class ConfigError(UserError):
    """A bad config file, key, type or override."""


class DataError(UserError):
    """Missing, corrupt or inconsistent training data."""


class LayoutError(UserError):
    """The MPI world does not fit the configured rank layout."""
