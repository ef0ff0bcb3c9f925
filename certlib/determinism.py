"""Deterministic kernels: the same inputs give bit-identical outputs, run after run.

On a CPU every kernel the library uses is already deterministic. On CUDA, cuDNN picks among
convolution algorithms (some accumulate with atomics, in a different order each run), and a
few backward kernels (scatter-add, adaptive pooling) are non-deterministic; torch's
deterministic mode forbids them, so a run either reproduces its bits or raises.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch

from certlib import CUBLAS_WORKSPACE

# The workspace configurations under which torch allows cuBLAS in deterministic mode.
DETERMINISTIC_WORKSPACES = (":4096:8", ":16:8")


def _use_deterministic_algorithms(mode: bool, warn_only: bool = False) -> None:
    """``torch.use_deterministic_algorithms``, without its import of inductor where inductor is
    not loaded yet: that call also sets inductor's flag, and imports all of torch._dynamo and
    inductor to do it (1.4 to 2 s of CPU in a process that certifies or calibrates without
    compiling; one that trains imports torch._dynamo anyway, when it builds its optimizer).
    Where it is skipped, ``before_compiling`` sets inductor's flag when something compiles."""
    if "torch._inductor.config" in sys.modules or not hasattr(torch._C, "_set_deterministic_algorithms"):
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)


def before_compiling() -> None:
    """Inductor's deterministic flag set to torch's, as ``torch.use_deterministic_algorithms``
    sets them together: call before ``torch.compile`` (it imports inductor)."""
    import torch._inductor.config as inductor_config

    inductor_config.deterministic = torch.are_deterministic_algorithms_enabled()


def _set(deterministic: bool) -> None:
    if deterministic:
        workspace = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        if workspace not in DETERMINISTIC_WORKSPACES:
            raise ValueError(
                f"deterministic kernels need CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} (or :16:8), "
                f"not {workspace[:40]!r}: set it before starting Python"
            )
    _use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    # cuDNN's autotuner times candidate algorithms and keeps the fastest: faster, not repeatable.
    torch.backends.cudnn.benchmark = not deterministic


def enable_deterministic_kernels() -> None:
    """Deterministic kernels for the rest of the process (a certification worker's setting).
    Call before the first CUDA operation."""
    _set(True)


@contextlib.contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """Deterministic kernels (``enabled``) or the fastest ones (cuDNN autotuning) inside the
    block; the process's previous settings are restored after it."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    _set(enabled)
    try:
        yield
    finally:
        _use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
