"""``python -m train ...``: bad settings end with one clear line and exit status 2; a run that
stops (a non-finite loss, a checkpoint that cannot be written) with one line and exit status 1."""

import sys

from train import RunStopped, main

if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
