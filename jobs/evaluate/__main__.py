"""`python -m jobs.evaluate --config FILE [key=value ...]`: the evaluate stage as a Ray job entrypoint."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
