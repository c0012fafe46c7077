"""Run under torchrun by tests/test_resume_dist.py: several `distlip` commands, one after the
other, in one launch (each launch costs ~10 s). argv[1] is a JSON list of argument lists."""

import json
import sys

from distlip.cli import main

if __name__ == "__main__":
    for argv in json.loads(sys.argv[1]):
        status = main(argv)
        if status:
            sys.exit(status)
