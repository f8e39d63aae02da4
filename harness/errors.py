"""Errors the user can fix: the CLI prints them as one line and exits with code 2."""


class HarnessError(Exception):
    """Bad input or a missing resource; the message is the whole explanation."""


class DataMissing(HarnessError):
    """A protocol's dataset is not on disk (the message says how to get it)."""
