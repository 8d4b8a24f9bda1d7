"""`python -m jobs.pipeline --config FILE [key=value ...]`: the whole pipeline as a Ray job entrypoint."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
