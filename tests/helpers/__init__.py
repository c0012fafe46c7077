"""Code the tests share: launchers, the scripts torchrun runs, in-process stand-ins for collectives."""

from pathlib import Path

HELPERS = Path(__file__).resolve().parent  # this folder: the scripts torchrun runs
ROOT = HELPERS.parents[1]  # the repository
