"""Errors that distlip reports to users as one clear line."""


class DistlipError(Exception):
    """A problem the user can fix; the CLI prints it as one line (no traceback)."""


class ConfigError(DistlipError, ValueError):
    """Invalid or contradictory configuration; the message names the key and the fix."""


class DataError(DistlipError, ValueError):
    """Missing, empty or malformed training data."""


class CheckpointError(DistlipError, RuntimeError):
    """A checkpoint that is missing, torn or corrupt."""
