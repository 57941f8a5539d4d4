"""Errors a user can fix. The CLI prints them as one line on stderr and exits with code 2."""


class UsageError(ValueError):
    """Bad input: an unknown model, a missing file, an empty text, an unsupported architecture, an option out of
    its range (a ValueError to the Python API)."""
