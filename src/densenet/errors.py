"""Error types of the package.

Every problem a user can cause (missing or corrupt data, wrong weights, unreadable images, bad
settings) is raised as a :class:`DenseNetError` subclass with a one-line message. The command line
prints that message and exits with status 2; it never shows a traceback for them.
"""


class DenseNetError(Exception):
    """Base class of the package's user-facing errors."""

    exit_code = 2


class DataError(DenseNetError):
    """Missing, incomplete or corrupt dataset files."""


class WeightsError(DenseNetError):
    """Weights or checkpoints that cannot be used: missing, corrupt or of another architecture."""


class ImageError(DenseNetError):
    """An image file that cannot be read or decoded."""


class ConfigError(DenseNetError):
    """Settings that contradict each other or name something that does not exist."""
