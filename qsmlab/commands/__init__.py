"""Sub-commands of the ``qsmlab`` CLI, one module each (see qsmlab/cli.py)."""
