"""certlib: the certification core for randomized smoothing (no Ray): noises, exact DSSN and
Monte Carlo voting, certificates, models and datasets."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("certify-smoothing")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
