"""Errors a user can fix. The CLI prints them as one line on stderr and exits with code 2."""


class UsageError(Exception):
    """Bad input: an unknown model, a missing file, an empty text, an unsupported architecture."""
