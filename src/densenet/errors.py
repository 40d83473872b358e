"""Error types of the package.

Every problem a user can cause (missing or corrupt data, wrong weights, unreadable images, bad
settings) is raised as a :class:`DenseNetError` subclass with a one-line message. The command line
prints that message and never shows a traceback. Exit statuses, one rule for every command:

- 2: the input is at fault (flags, settings, data, weights, images): every DenseNetError but
  ResourceError;
- 1: the machine refused (:class:`ResourceError`, or an OSError/MemoryError the command did not
  expect): an output that cannot be written (read-only, disk full, a file in the way) or memory
  that ran out;
- 130: interrupted by Ctrl-C; 143: ``densenet train`` stopped by SIGTERM after saving a checkpoint.
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


class TrainingError(DenseNetError):
    """Training cannot go on: the loss diverged, or a checkpoint does not fit the run."""


class ResourceError(DenseNetError):
    """The machine refused: an output cannot be written (read-only, disk full, a file in the way) or
    memory ran out. The input may be fine; exit status 1."""

    exit_code = 1
