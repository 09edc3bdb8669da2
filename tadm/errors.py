"""The errors a user can meet. Each message names what is wrong and where; commands turn them into
exit codes (0 all good, 1 some inputs failed, 2 unusable invocation) instead of tracebacks.

They also subclass the builtin error a caller would expect (``ValueError``), so code written
against plain Python exceptions keeps working.
"""

from __future__ import annotations


class TadmError(Exception):
    """Base of every error tadm raises about the user's files, options or environment."""


class CheckpointError(TadmError, ValueError):
    """A file that is not a (usable) tadm checkpoint, or an export that cannot be written; names the file."""


class InputError(TadmError, ValueError):
    """A command-line input that names nothing usable (missing path, empty folder, clashing names)."""


class LRFileError(TadmError, ValueError):
    """An LR file this checkpoint cannot upscale (other model or scale, resized, bad metadata)."""


class OutputWriteError(TadmError, OSError):
    """An output file that could not be written (full disk, quota, read-only folder); names the file. Nothing
    half-written is left: the name holds what it held before (or nothing), and the temp file is gone."""

    @classmethod
    def of(cls, path: object, err: OSError) -> OutputWriteError:
        """The error for ``err`` raised while writing ``path`` (its errno kept)."""
        out = cls(f"cannot write '{path}': {err.strerror or err}")
        out.errno = err.errno
        return out


class ShardError(TadmError, ValueError):
    """A problem with a shard set or with ``tadm shard``'s input or output folder."""


class ConfigError(TadmError, ValueError):
    """A configuration whose objects cannot be built; the message names the value and the problem."""


class TrainingDiverged(TadmError, RuntimeError):
    """Training stopped after too many steps in a row with a non-finite loss or gradient; names the step,
    the non-finite loss terms and the last checkpoint that holds finite weights."""


class CheckpointSaveError(TadmError, OSError):
    """One or more checkpoints could not be written (full disk, quota, read-only folder); the previous file
    under each name was left intact."""


class Preempted(TadmError, RuntimeError):
    """A SIGTERM (a scheduler preempting the job) stopped training after a resumable checkpoint was saved;
    names the checkpoint to resume from."""
