"""The base classifier f evaluated in a precision cascade: fast precisions first, and every
prediction whose top-two logits are too close to call re-evaluated in the next, more precise
level, down to a float64 copy of the network.

Why a cascade. A vote must be a pure function of (weights, image, noise): the same whatever the
batch size, shard, worker, precision or compilation. Logits computed in a low precision differ
from the float64 network's by at most some error e (relative to 1 + |top logit|). If the fast
margin between the top two logits exceeds the level's near-tie band and the band exceeds 2e,
the fast argmax is the float64 network's argmax; only predictions inside the band need the
next level. The last level, float64, calls a margin under ``EXACT_TIE`` a tie and gives it to
the lower class index. So every level returns the float64 network's prediction, and a faster
level only changes how many samples the slower ones see.

Levels and their bands (``LEVELS``). Each band is at least 4x the worst error against the float64
network measured on a trained WRN-40-2 (DSSN noise, sigma 1.0), worst over every DSSN copy of
100+ CIFAR-10 test images at sigma 0.25/1.0/3.5, on an H100 (torch 2.11): fp32 8.7e-7, tf32
1.7e-3, fp16 2.0e-3, bf16 2.1e-2; on a CPU (2 cores, torch 2.15): fp32 3.7e-7, bf16 1.2e-2.
``python bench/suite.py --acceptance`` re-measures them on the device it runs on, for the
folded (and compiled) network the engines use.

Runtime spot check. Before a cascade counts its first vote, it evaluates the first samples at
every level and compares them with the float64 network: a level whose error exceeds half its
band is refused (a one-line error), or, under ``precision="auto"``, left out of the cascade with
a warning. The check runs once per ``Cascade`` (a worker keeps one per model), not per call.

Fast path. Every level but float64 evaluates a copy of the network with each BatchNorm that
follows a convolution folded into it (``fold_batchnorm``), in channels_last layout; the first
level can run through ``torch.compile`` for one static batch shape (short batches padded). The
float64 reference is the unfolded network.

Units: images in pixel scale [0, 1]; logits as the model returns them; bands relative to
1 + |top logit|.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypedDict

import torch

from certlib.determinism import before_compiling

# float64 margin (relative) up to which two logits count as tied. Float64 logits can move by
# ~1e-16 with the batch's make-up, so a margin within that of this cut could still flip: odds
# of ~1e-7 per sample inside the fp32 band, and none outside it.
EXACT_TIE = 1e-9
BAND_CHECK_SAMPLES = 8  # samples compared with the float64 network when a cascade starts
NOT_FINITE = "the model returned NaN or infinite logits on noisy inputs; refusing to count votes"


@dataclass(frozen=True)
class Level:
    """One evaluation precision of the cascade."""

    name: str
    autocast: torch.dtype | None  # the autocast dtype; None: the network's own float32 (or float64)
    tf32: bool  # float32 convolutions and matmuls on TF32 tensor cores (CUDA)
    band: float  # near-tie band relative to 1 + |top logit|; 0 for the exact level
    worst_error: float  # the measured worst error behind the band (module docstring)


LEVELS: dict[str, Level] = {
    level.name: level
    for level in (
        Level("fp16", torch.float16, False, band=8e-3, worst_error=2.0e-3),
        Level("bf16", torch.bfloat16, False, band=1e-1, worst_error=2.1e-2),
        Level("tf32", None, True, band=7e-3, worst_error=1.7e-3),
        Level("fp32", None, False, band=1e-4, worst_error=8.7e-7),
        Level("fp64", None, False, band=0.0, worst_error=0.0),
    )
}
PRECISIONS = ("auto", *LEVELS)  # what a user may ask for: a first level, or auto


class EngineOptions(TypedDict, total=False):
    """How an engine evaluates a model: speed and memory only, never a vote. ``batch_size``
    (default: sized to the device), ``device`` (default: the model's), ``precision`` (the
    cascade's first level or ``auto``) and ``compile`` (true, false or ``auto``)."""

    batch_size: int | None
    device: torch.device | str | None
    precision: str | None
    compile: bool | str | None


COMPILE_MODE = {"cuda": "max-autotune", "cpu": None}  # torch.compile mode per device type


def cascade_levels(first: str, device_type: str) -> tuple[str, ...]:
    """The levels a cascade starting at ``first`` runs through on ``device_type``, fastest first:
    fp16/bf16 -> tf32 (CUDA only) -> fp32 -> fp64."""
    if first not in LEVELS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {first!r}")
    if first in ("fp16", "tf32") and device_type != "cuda":
        raise ValueError(f"precision {first} needs a CUDA device; use bf16 or fp32 on a CPU")
    order = ["fp16" if first == "fp16" else "bf16", "tf32", "fp32", "fp64"]
    chain = order[order.index(first) :]
    return tuple(level for level in chain if level != "tf32" or device_type == "cuda")


def cuda_has_fast_fp16(device: torch.device) -> bool:
    """Tensor cores (compute capability 7.0 and later) or the P100's fp16 units (6.0)."""
    major, minor = torch.cuda.get_device_capability(device)
    return major >= 7 or (major, minor) == (6, 0)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The first level of the cascade for ``precision`` on ``device``. ``auto``: fp16 on a GPU
    with fast fp16, fp32 otherwise. On a CPU, bf16 first was slower than fp32 where it mattered:
    with a trained WRN-40-2, 48-74% of its samples fell in its band, as bf16's error (1.2e-2)
    needs a wide one, and their fp32 re-evaluation cost more than bf16 saved (bench/NOTES.md)."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and cuda_has_fast_fp16(device):
        return "fp16"
    return "fp32"


def resolve_compile(compile: bool | str, device: torch.device) -> bool:
    """``auto`` compiles on GPUs, where fusing the elementwise kernels and CUDA graphs pay for the
    compilation within a worker's first unit; on a CPU it gives 3-9% (bench/NOTES.md) and needs
    a C++ compiler, so ``auto`` leaves it off there."""
    if compile == "auto":
        return device.type == "cuda"
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be true, false or 'auto', got {compile!r}")
    return compile


def disable_tf32() -> None:
    """Make float32 mean float32 on CUDA: TF32's ~1e-3 relative error would exceed the fp32
    band. A cascade calls it when built and after each call of its tf32 level; call it before
    timing or compiling a model outside one, as torch.compile guards on the matmul flag."""
    _set_tf32(False)


def _set_tf32(enabled: bool) -> None:
    # Since torch 2.9 the legacy flags set cuDNN's precision to "none", which falls back to a
    # global ``torch.backends.fp32_precision`` = "tf32" set by any code in the process: the new
    # per-backend settings are set explicitly wherever they exist. Set, never read: reading the
    # legacy flags raises once the new API has been used.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    if hasattr(torch.backends.cudnn, "conv"):
        precision = "tf32" if enabled else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    # Outside a tf32 level TF32 is off, as the cascade's other levels need.
    _set_tf32(enabled)
    try:
        yield
    finally:
        disable_tf32()


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` (in eval mode) with every BatchNorm that directly follows a convolution
    folded into that convolution's weights and bias (inference only). Uses torch.fx's
    conv-BN fusion; a model torch.fx cannot trace, or without such a pair, is returned as is.
    BatchNorms on a residual sum (pre-activation networks) stay: torch.compile fuses them with
    their neighbours instead."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model.eval())
    except Exception as err:  # untraceable (data-dependent control flow, custom modules): run it unfolded
        warnings.warn(
            f"BatchNorm not folded ({type(err).__name__}: {err}); evaluating the network unfolded", stacklevel=2
        )
        return model


def model_device(model: torch.nn.Module, fallback: torch.device | str) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device(fallback)


def _layout(x: torch.Tensor) -> torch.Tensor:
    # channels_last: 1.4x faster convolutions on a CPU (oneDNN), tensor-core layout on a GPU
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


class Cascade:
    """The base classifier ``model`` behind a precision cascade, built once per worker and model
    (the engines build a throw-away one when given a plain module).

    ``precision``: the first level (``auto``, fp16, bf16, tf32, fp32 or fp64; see
    ``resolve_precision``); the rest follow ``cascade_levels``. ``compile``: run the first level
    through ``torch.compile`` for the static shape (``batch_size``, sample), ``auto`` on GPUs.
    Holds the folded fast network, its compiled form, the float64 reference and which levels
    passed the spot check, so later engine calls pay none of them again. Puts ``model`` in eval
    mode; a model with nothing to fold is also switched to channels_last in place.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        num_classes: int,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        precision: str = "auto",
        compile: bool | str = "auto",
    ):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.device = torch.device(device) if device is not None else model_device(model, "cpu")
        self.model = model.eval()
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self.auto = precision == "auto"
        self.levels = cascade_levels(resolve_precision(precision, self.device), self.device.type)
        self.compiled = resolve_compile(compile, self.device)
        self._compile_asked = compile is True
        self._fast: torch.nn.Module | None = None
        self._compiled_fast: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._reference: torch.nn.Module | None = None
        self._checked = False
        disable_tf32()

    @property
    def name(self) -> str:
        """The levels in order, e.g. ``fp16>tf32>fp32>fp64``: recorded with the results."""
        return ">".join(self.levels)

    def band(self, level: str) -> float:
        return LEVELS[level].band

    # ----------------------------------------------------------------------- evaluation

    @torch.inference_mode()
    def logits(self, level: str, x: torch.Tensor) -> torch.Tensor:
        """float32 logits (B, num_classes) of ``x`` evaluated at ``level`` (not fp64)."""
        spec = LEVELS[level]
        with (
            torch.autocast(self.device.type, dtype=spec.autocast or torch.float32, enabled=spec.autocast is not None),
            _tf32(spec.tf32),
        ):
            if level == self.levels[0] and self.compiled:
                logits = self._compiled_logits(x)
            else:
                logits = self.fast_network()(_layout(x))
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"the model returned logits of shape {tuple(logits.shape)}, expected (batch, {self.num_classes})"
            )
        return logits.float()

    @torch.inference_mode()
    def reference_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the unfolded network in float64, the reference every level answers to."""
        if self._reference is None:  # built once: a float64 copy per call cost 7% of a GPU engine's time
            self._reference = copy.deepcopy(getattr(self.model, "_orig_mod", self.model)).double()
        return self._reference(x.double())

    @torch.inference_mode()
    def exact_prediction(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """argmax of the float64 logits, a margin up to ``EXACT_TIE`` going to the lower class,
        and whether every logit was finite (a 0-dim bool on the device: no synchronization)."""
        logits = self.reference_logits(x)
        top = logits.max(dim=1, keepdim=True).values
        tied = logits >= top - EXACT_TIE * (1 + top.abs())
        return tied.to(torch.uint8).argmax(dim=1), torch.isfinite(logits).all()  # argmax: the first of the tie

    def fast_network(self) -> torch.nn.Module:
        if self._fast is None:
            self._fast = fold_batchnorm(self.model)
            self._fast.to(memory_format=torch.channels_last)
        return self._fast

    def _compiled_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self._compiled_fast is None:
            before_compiling()
            self._compiled_fast = torch.compile(self.fast_network(), mode=COMPILE_MODE[self.device.type], dynamic=False)
        size = len(x)
        if size < self.batch_size:  # one static shape: a new one would recompile
            x = torch.cat([x, x[:1].expand(self.batch_size - size, *x.shape[1:])])
        if self.device.type == "cuda":  # CUDA graphs: the previous call's outputs are consumed by now
            torch.compiler.cudagraph_mark_step_begin()
        try:
            return self._compiled_fast(_layout(x))[:size].clone()
        except Exception as err:
            if self._compile_asked:
                raise
            # torch.compile's BackendCompilerFailed says only "backend='inductor' raised:" on its
            # first line; the cause (no Triton, no C compiler) is its inner exception.
            cause = getattr(err, "inner_exception", None) or err
            reason = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ""
            warnings.warn(f"torch.compile failed ({type(cause).__name__}: {reason}); evaluating eagerly", stacklevel=2)
            self.compiled = False
            return self.fast_network()(_layout(x[:size]))

    # ----------------------------------------------------------------------- spot check

    @torch.inference_mode()
    def check(self, x: torch.Tensor) -> None:
        """The band's premise on this device, once per cascade: each level's logits of the first
        samples of ``x`` against the float64 network's. An argmax outside a band of width b
        (relative to the fast top logit) is the float64 one while the error e (relative to the
        float64 top logit) satisfies b (1 - e) >= 2 e, i.e. e <= b / (2 + b). A level that
        fails is left out with a warning (the next level takes its samples, so no vote
        changes), except the requested first level, which is refused unless ``precision`` is
        auto."""
        if self._checked:
            return
        sample = x[:BAND_CHECK_SAMPLES]
        exact = self.reference_logits(sample)
        if not bool(torch.isfinite(exact).all()):
            raise ValueError(NOT_FINITE)
        scale = 1 + exact.max(dim=1).values.abs()
        kept = []
        for level in self.levels[:-1]:
            logits = self.logits(level, sample).double()
            error = float(((logits - exact).abs().max(dim=1).values / scale).max().nan_to_num(nan=math.inf))
            allowed = self.band(level) / (2 + self.band(level))
            if error <= allowed:
                kept.append(level)
                continue
            message = (
                f"{level} logits on this device differ from the float64 network's by {error:.1e} (relative), "
                f"more than the {allowed:.1e} its near-tie band {self.band(level):.0e} allows: "
                "votes could depend on the batching"
            )
            if level == self.levels[0] and not self.auto:
                raise RuntimeError(message + "; refusing to count them")
            warnings.warn(message + f"; leaving {level} out of the cascade", stacklevel=2)
            if level == self.levels[0]:
                self.compiled = False  # compilation is for the first level only
        self.levels = (*kept, self.levels[-1])
        self._checked = True
