"""The one exception type a user sees: a single line saying what is wrong and what to do."""


class PipelineError(Exception):
    """A problem with the user's input or environment, reported as one line (exit code 2)."""

    exit_code = 2


class DriftError(PipelineError):
    """A stage drifted past its budget: the build stops (exit code 3)."""

    exit_code = 3
