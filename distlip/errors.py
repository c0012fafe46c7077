"""Errors that distlip reports to users as one clear line."""

import difflib


class DistlipError(Exception):
    """A problem the user can fix; the CLI prints it as one line (no traceback)."""


class ConfigError(DistlipError, ValueError):
    """Invalid or contradictory configuration; the message names the key and the fix."""


class DataError(DistlipError, ValueError):
    """Missing, empty or malformed training data."""


class CheckpointError(DistlipError, RuntimeError):
    """A checkpoint that is missing, torn or corrupt."""


def did_you_mean(name: str, options) -> str:
    """` (did you mean 'x'?)` for the closest of `options` to a mistyped `name`, or ""."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
