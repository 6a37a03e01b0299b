"""`python -m rtmanager.ctl`: the same client as `rtmanager ctl`, without the
`rtmanager` command in front (its parser is `build_parser`'s)."""

import sys

from rtmanager.ctl import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
