"""The exceptions a user sees, each a single line saying what is wrong and what to do, and their exit codes.

Exit codes (docs/faults.md lists the faults behind each): 0 success, 2 PipelineError (bad input or
environment), 3 DriftError, 4 BusyError (--no-wait and the build folder is locked), 5 OutOfSpaceError
(a full disk or a file-size limit), 130 SIGINT (Ctrl-C), 143 SIGTERM.
"""


class PipelineError(Exception):
    """A problem with the user's input or environment, reported as one line (exit code 2)."""

    exit_code = 2


class DriftError(PipelineError):
    """A stage drifted past its budget: the build stops (exit code 3)."""

    exit_code = 3


class BusyError(PipelineError):
    """Another process holds the build folder's lock and --no-wait was given (exit code 4)."""

    exit_code = 4


class OutOfSpaceError(PipelineError):
    """A stage could not be written: the disk is full, or a file reached the file-size limit (exit code 5)."""

    exit_code = 5
