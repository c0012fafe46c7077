"""`python -m distlip <command> ...` and, under a launcher, `torchrun -m distlip train ...` or
`accelerate launch -m distlip train ...`: every rank runs the CLI, then ends through `exit_process`."""

from distlip.cli import entry

if __name__ == "__main__":
    entry()
