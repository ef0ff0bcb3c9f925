"""``python -m cluster.cli``: the ``certify`` command."""

from cluster.cli import main

main()
