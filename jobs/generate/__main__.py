"""`python -m jobs.generate --config FILE [key=value ...]`: the generate stage as a Ray job entrypoint."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
