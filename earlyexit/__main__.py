"""``python -m earlyexit`` runs the command line."""

from .cli import main

main(prog_name="python -m earlyexit")
