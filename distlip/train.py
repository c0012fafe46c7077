"""`python -m distlip.train --config ...`: the entry point launchers (torchrun, accelerate) call."""

import sys

from distlip.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
