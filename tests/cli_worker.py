"""Run under torchrun by tests/test_resume_dist.py: several `distlip` commands, one after the
other, in one launch (each launch costs ~10 s). argv[1] is a JSON list of argument lists."""

import json
import sys

from distlip.cli import main
from distlip.distributed.env import run_and_exit


def run_all() -> int:
    """Each command in turn; the first non-zero status (or preemption's exit) ends the launch."""
    for argv in json.loads(sys.argv[1]):
        status = main(argv)
        if status:
            return status
    return 0


if __name__ == "__main__":
    run_and_exit(run_all)
