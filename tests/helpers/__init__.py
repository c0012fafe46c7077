"""Code the tests share: launchers, the scripts torchrun runs, in-process stand-ins for collectives."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
