"""`python -m diffquant ...` is the `diffquant` command."""

import sys

from diffquant.cli import main

sys.exit(main())
