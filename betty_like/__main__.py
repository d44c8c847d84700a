"""``python -m betty_like experiment=<name> ...``: the Hydra CLI (:mod:`betty_like.cli`)."""

from .cli import main

main()
