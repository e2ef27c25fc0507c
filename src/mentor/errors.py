"""Every error a user can cause, in one place that every module and family imports.

Each is a :class:`MentorError`: its message is one paragraph naming the key, file or run involved and
the fix, so the command line prints it without a traceback (exit status 2 for a recipe or argument
error, 1 for anything else). Code that raises one leaves nothing half-written behind.
"""

from __future__ import annotations


class MentorError(Exception):
    """Base of the errors a user can cause and fix; the message says which input and how."""

    exit_code = 1


class ConfigError(MentorError, ValueError):
    """A recipe, override or command-line argument is invalid; the message names the key and the fix."""

    exit_code = 2


class DataError(MentorError):
    """A missing, truncated, corrupt or mismatched data file or folder (which, and how to fix it)."""


class CheckpointError(MentorError, RuntimeError):
    """A checkpoint file cannot be read (missing, truncated, not a mentor checkpoint)."""


class CheckpointMismatchError(ConfigError):
    """The run directory holds a run of another recipe than the one given (the message lists the keys)."""


class RunDirError(MentorError):
    """The run directory cannot be used: not writable, or in use by another process."""


class NonFiniteLossError(MentorError, RuntimeError):
    """A loss term, or a value of the trained state (parameters, buffers, optimizer state), became NaN or
    infinite; nothing non-finite was written."""


class TeacherError(MentorError, ValueError):
    """A teacher or source run cannot be used with this student: missing, unreadable or incompatible."""


class GraphCaptureError(MentorError, RuntimeError):
    """The method's training step cannot be captured as a CUDA graph (the message says why)."""


class ContractError(MentorError, TypeError):
    """A method breaks the Method contract (the message names the rule; see mentor.methods.base)."""


class SampleError(MentorError, ValueError):
    """A sampling request that cannot be served (unknown solver, run without a denoiser, ...)."""


class ReportError(MentorError):
    """``mentor report`` cannot read its input (not a run, no runs, an unreadable file) or lacks matplotlib."""


class ExportError(MentorError):
    """``mentor export`` cannot write the network (no checkpoint, unknown format, a missing optional package, a
    check that fails), or an exported file cannot be read back (no sidecar)."""
