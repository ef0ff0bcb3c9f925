"""certlib: the certification core for randomized smoothing (no Ray): noises, exact DSSN and
Monte Carlo voting, certificates, models and datasets."""

import os
from importlib.metadata import PackageNotFoundError, version

# Deterministic cuBLAS needs a fixed workspace, and torch reads this variable once, at a process's
# first cuBLAS call: set later (when deterministic training starts after a model was already timed,
# as `certify plan` does) it is ignored and every matmul raises. So it is set when certlib is
# imported (a user's own value is kept; ``determinism`` checks it). 8 buffers of 4 MiB per handle.
CUBLAS_WORKSPACE = ":4096:8"
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)

try:
    __version__ = version("certify-smoothing")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
