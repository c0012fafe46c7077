"""`python -m distlip.train --config ...`: the entry point launchers (torchrun, accelerate) call."""

import sys

from distlip.cli import main
from distlip.engine import run_and_exit

if __name__ == "__main__":
    run_and_exit(lambda: main(["train", *sys.argv[1:]]))
