"""cluster: Ray orchestration of certification sweeps and the ``certify`` command line."""
