"""One-line errors for the ``certify`` command line: exit code 2, tracebacks with ``--debug``."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import click


class UserError(click.ClickException):
    """One line for the user, exit code 2."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.message}", err=True)


def user_errors(fn):
    """Turn errors into one-line UserErrors with exit code 2 (tracebacks with --debug): bad
    specs and cards (ValueError), missing or unreadable files and unreachable clusters
    (OSError), the Ray client's refusals (RuntimeError), a failed `ray start`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:  # the reader went away (`certify logs x | head`): not an error
            sys.stderr.close()
            sys.exit(0)
        except (ValueError, OSError, RuntimeError, subprocess.CalledProcessError) as err:
            if os.environ.get("CERTIFY_DEBUG"):
                raise
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise UserError(lines[0] if lines else type(err).__name__) from None

    return wrapper
