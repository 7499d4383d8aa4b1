"""`python -m diffquant ...` is the `diffquant` command."""

from diffquant.cli import entry

entry()
