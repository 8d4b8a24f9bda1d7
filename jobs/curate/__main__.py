"""`python -m jobs.curate --config FILE [key=value ...]`: the curate stage as a Ray job entrypoint."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["curate", *sys.argv[1:]]))
