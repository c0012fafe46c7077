"""Errors that distlip reports to users as one clear line, and the one way commands print them."""

import difflib
import sys
from collections.abc import Callable


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


def print_error(message: object) -> None:
    """Report a problem to the user: one `error: ...` line on stderr."""
    print(f"error: {message}", file=sys.stderr)


def run_command(command: Callable[..., int], *args) -> int:
    """`command(*args)`'s exit code; a `DistlipError` is printed as one line with exit code 2
    (no traceback), Ctrl-C as `interrupted` with 130. Every `distlip` subcommand runs through it."""
    try:
        return command(*args)
    except DistlipError as exc:
        print_error(exc)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
