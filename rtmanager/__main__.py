"""`python -m rtmanager`: the `rtmanager` command (`serve`, `migrate`, `ctl`, ...)."""

import sys

from rtmanager.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
