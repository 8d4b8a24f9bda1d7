"""`python -m jobs.experiment --config FILE [key=value ...]`: an experiment as a Ray job entrypoint."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", *sys.argv[1:]]))
