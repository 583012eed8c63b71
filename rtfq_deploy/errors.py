"""Errors a user can cause and fix; the CLI turns them into one line and exit code 2."""


class RtfqError(Exception):
    """Base of every user-facing error (bad input, bad file, value outside the space)."""


class CheckpointError(RtfqError):
    """A checkpoint or weights file that cannot be used: missing, corrupt, foreign, unsafe."""
