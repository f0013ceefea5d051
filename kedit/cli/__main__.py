"""`python -m kedit.cli`: the console script."""

from kedit.cli import main

main()
