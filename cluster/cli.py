"""The ``certify`` command line."""

import click

import certlib


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(certlib.__version__, prog_name="certify")
def main() -> None:
    """Batch certification of randomized-smoothing classifiers (DSSN, SSN, uniform, Gaussian,
    Laplace) on a local or remote Ray cluster."""
