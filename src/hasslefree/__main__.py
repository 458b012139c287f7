"""``python -m hasslefree`` (and ``torchrun ... -m hasslefree compress ...``): the command line."""

import sys

from hasslefree.cli import main

sys.exit(main())
