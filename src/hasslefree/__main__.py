"""``python -m hasslefree`` (and ``torchrun ... -m hasslefree compress ...``): the command line."""

import sys

from hasslefree.cli import main

if __name__ == "__main__":
    sys.exit(main())
