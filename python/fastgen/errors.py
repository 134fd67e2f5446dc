"""Exceptions that front ends catch, importable without torch (so a CLI's usage errors and
--help stay fast)."""


class ModelLoadError(Exception):
    """A model could not be found, read or built; the message says which and why, on one line."""
