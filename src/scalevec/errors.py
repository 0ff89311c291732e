"""The two kinds of error a scalevec command ends with.

Every error a command can meet is one of them, with a one-line message that names the problem and the fix:
`BadInput` (a config, data, argument, path, checkpoint or run directory that cannot be used as given; refused
before anything is written; exit 2) or `RunStopped` (a run or write that had to stop part-way; what was saved
stays valid; exit 1). Subclasses name the part of scalevec that raised them, and exist where a caller catches
them.
"""

from __future__ import annotations


class BadInput(ValueError):
    """Input that cannot be used as given; nothing was written."""

    exit_code = 2


class RunStopped(RuntimeError):
    """A run or write that had to stop; what it had saved stays valid."""

    exit_code = 1
