"""`python -m jobs.train --config FILE [key=value ...]`: the train stage as a Ray job entrypoint."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
