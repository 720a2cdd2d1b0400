"""Exceptions raised by chisel. Each message says what is wrong, the likely cause and the fix."""

from __future__ import annotations


class ChiselError(Exception):
    """Base class of every error chisel raises on purpose."""


class RecordConfigError(ChiselError, ValueError):
    """An option of `chisel.record` is invalid."""


class RunExistsError(ChiselError, FileExistsError):
    """The run directory already holds a run and neither `overwrite` nor `resume` was given."""


class NotARunError(ChiselError, FileNotFoundError):
    """A directory given as a run has no chisel manifest."""


class ManifestError(NotARunError):
    """The run's manifest.json is unreadable, not JSON, from a newer chisel, or has a field
    missing or wrong; the message names the field and the fix."""


class StepTypeError(ChiselError, TypeError):
    """A step index that is not an integer (a bool, a string, a float, a tensor of many values)."""


class ResumeMismatchError(ChiselError, ValueError):
    """`resume=True` on a run whose parameters differ from the model's."""


class CorruptStepError(ChiselError, OSError):
    """A file of one step cannot be read; the other steps stay readable."""


class StepOutOfRangeError(ChiselError, IndexError):
    """A step index outside the recorded steps."""


class SkippedStepError(ChiselError, LookupError):
    """The optimizer step was skipped (e.g. AMP found inf gradients): it has no update."""


class TagError(ChiselError, ValueError):
    """A value given to `Recorder.tag` cannot be attached to the step."""


class UnknownModuleError(ChiselError, KeyError):
    """A module name that the model does not have, or one chisel cannot take factors of."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WriterError(ChiselError, RuntimeError):
    """The background writer failed (disk full, permissions); earlier steps are on disk."""


class MissingStepsWarning(UserWarning):
    """Step files are missing from the middle of a run: it reads only up to the gap."""


class UnverifiedRunWarning(UserWarning):
    """A run written before chisel stored checksums: its files are read without verification."""


class FactorsSkippedWarning(UserWarning):
    """factors=True found layers with weights whose per-sample factors chisel does not take."""


class RankMismatchError(ChiselError, RuntimeError):
    """Ranks of a distributed job hold different parameters after an optimizer step (DDP
    should keep them equal bit for bit): the run cannot record one update."""


class MissingShardError(CorruptStepError):
    """A rank's shard (per-sample factors and tags) of a distributed run's step is not on disk."""


class PartialFactorsError(ChiselError, ValueError):
    """A distributed run's factor module ran on some ranks only in a step: its rows cannot be
    matched to the global batch's samples (and tags)."""
