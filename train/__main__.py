"""``python -m train ...``: bad settings end with one clear line and exit status 2."""

import sys

from train import main

if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
