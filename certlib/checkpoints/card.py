"""The model card: what a checkpoint's weights are and how they must be certified, and the one
place a card read from a file is validated (``ModelCard.from_json``): its JSON bounded in size
and depth, every field checked by type and range, the fields checked against each other. A card
that fails is refused with one line naming the field; reading a card never runs code (its
``architecture`` is a name; building it is ``certlib.checkpoints.trust``'s business).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import certlib
from certlib.checkpoints.trust import factory_problem, short
from certlib.families import FAMILIES
from certlib.models import ARCHITECTURES

if TYPE_CHECKING:
    from certlib.data import QuantizedDataset
    from certlib.families import SmoothingNoise

CARD_FORMAT = 1
MAX_CARD_CHARS = 4 * 2**20  # ImageNet-21k's class names fit ten times over
MAX_INPUT_ELEMENTS = 2**24  # an input of more values than this (3 x 2364 x 2364) is not an image
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LIBRARY_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,100}")


@dataclass
class ModelCard:
    """What a checkpoint's weights are and how they must be certified.

    Pixel scale [0, 1]; ``q`` is the dataset's quantization; ``lam`` the effective lambda of the
    noise (L/(2q) for DSSN); ``levels`` is L (DSSN only); ``seed`` is the DSSN offset seed and the
    training seed.
    """

    architecture: str
    dataset: str
    class_names: list[str]
    input_shape: list[int]
    mean: list[float]
    std: list[float]
    q: int
    method: str
    sigma: float
    lam: float | None
    levels: int | None
    seed: int
    training: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    epochs_done: int = 0
    clean_accuracy: float | None = None
    noisy_accuracy: float | None = None
    heldout: str | None = None
    # where imported weights came from (layout, file, its SHA-256, ...); empty for trained models
    source: dict[str, Any] = field(default_factory=dict)
    library_version: str = certlib.__version__
    weights_sha256: str = ""
    format: int = CARD_FORMAT

    @classmethod
    def describing(
        cls,
        architecture: str,
        images: QuantizedDataset,
        noise: SmoothingNoise,
        *,
        seed: int,
        training: str,
        **fields: Any,
    ) -> ModelCard:
        """The card of a model of ``architecture`` for the dataset of ``images`` (its classes,
        input shape, normalization and q), trained under ``noise`` (its method, sigma, effective
        lambda and L) with ``seed`` and ``training``; ``fields`` set the rest."""
        described = noise.describe()
        return cls(
            **{
                "architecture": architecture,
                "dataset": images.name,
                "class_names": list(images.class_names),
                "input_shape": list(images.input_shape),
                "mean": list(images.mean),
                "std": list(images.std),
                "q": images.q,
                "method": noise.name,
                "sigma": noise.sigma,
                "lam": described.get("lambda"),
                "levels": described.get("levels"),
                "seed": seed,
                "training": training,
                **fields,
            }
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: Any) -> ModelCard:
        """The card of a checkpoint's JSON text, validated (one-line ValueError naming the
        field): written by this library or by anyone."""
        data = _parse(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ValueError(f"model card: unknown fields {short(unknown)}: written by a newer library?")
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"model card: lacks the fields {missing}")
        for name, value in data.items():
            problem = _RULES[name](value)
            if problem:
                raise ValueError(f"model card: {name}: {problem}, got {short(value)}")
        card = cls(**data)
        _check_together(card)
        return card


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def _parse(text: Any) -> dict[str, Any]:
    if not isinstance(text, str):
        raise ValueError(f"model card: stored as a {type(text).__name__}, not as JSON text")
    if len(text) > MAX_CARD_CHARS:
        raise ValueError(f"model card: {len(text):,} characters, more than a card holds ({MAX_CARD_CHARS:,})")
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("model card: nested too deeply to be a card") from None
    except ValueError as err:  # JSONDecodeError, NaN/Infinity, an integer of thousands of digits
        raise ValueError(f"model card: not valid JSON ({str(err).splitlines()[0][:100]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"model card: must be a JSON object, got a {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- field rules: None if valid, else why


Rule = Callable[[Any], "str | None"]


def _text(limit: int = 200, empty: bool = False) -> Rule:
    def rule(value: Any) -> str | None:
        if not isinstance(value, str) or (not value and not empty) or len(value) > limit:
            return f"must be a {'' if empty else 'non-empty '}string of at most {limit} characters"
        return None

    return rule


def _integer(low: int, high: int) -> Rule:
    def rule(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return f"must be an integer in [{low}, {high}]"
        return None

    return rule


def _real(low: float | None = None, high: float | None = None, positive: bool = False) -> Rule:
    def rule(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return "must be a finite number"
        if (positive and value <= 0) or (low is not None and value < low) or (high is not None and value > high):
            return "must be > 0" if positive else f"must lie in [{low}, {high}]"
        return None

    return rule


def _optional(rule: Rule) -> Rule:
    return lambda value: None if value is None else rule(value)


def _listing(item: Rule, low: int, high: int) -> Rule:
    def rule(value: Any) -> str | None:
        if not isinstance(value, list) or not low <= len(value) <= high:
            return f"must be a list of {low} to {high} items"
        problems = [(i, p) for i, v in enumerate(value) if (p := item(v))]
        return f"item {problems[0][0]} {problems[0][1]}" if problems else None

    return rule


def _mapping(value: Any) -> str | None:
    return None if isinstance(value, dict) else "must be a JSON object"


def _architecture(value: Any) -> str | None:
    if not isinstance(value, str) or not 0 < len(value) <= 200:
        return "must be a non-empty string of at most 200 characters"
    kind, colon, name = value.partition(":")
    if not colon:
        return None if value in ARCHITECTURES else f"unknown; expected one of {', '.join(ARCHITECTURES)} or an import"
    if kind in ("torchvision", "timm"):
        return None if _LIBRARY_NAME.fullmatch(name) else f"{kind}: needs a model name"
    if kind == "factory":
        return factory_problem(value)
    return "unknown kind; expected a built-in name or torchvision:, timm:, factory:"


def _digest(value: Any) -> str | None:
    return None if isinstance(value, str) and _SHA256.fullmatch(value) else "must be a SHA-256 in hexadecimal"


def _method(value: Any) -> str | None:
    return None if isinstance(value, str) and value in FAMILIES else f"must be one of {', '.join(FAMILIES)}"


_RULES: dict[str, Rule] = {
    "architecture": _architecture,
    "dataset": _text(100),
    "class_names": _listing(_text(200, empty=True), 1, 100_000),
    "input_shape": _listing(_integer(1, 2**16), 1, 4),
    "mean": _listing(_real(), 1, 64),
    "std": _listing(_real(positive=True), 1, 64),
    "q": _integer(1, 2**16),
    "method": _method,
    "sigma": _real(positive=True),
    "lam": _optional(_real(positive=True)),
    "levels": _optional(_integer(1, 2**31)),
    "seed": _integer(0, 2**63 - 1),
    "training": _text(100),
    "hyperparameters": _mapping,
    "epochs_done": _integer(0, 2**31),
    "clean_accuracy": _optional(_real(0, 1)),
    "noisy_accuracy": _optional(_real(0, 1)),
    "heldout": _optional(_text(200)),
    "source": _mapping,
    "library_version": _text(100),
    "weights_sha256": _digest,
    "format": lambda v: None if _integer(1, CARD_FORMAT)(v) is None else f"must be {CARD_FORMAT} (a newer library's?)",
}


def _check_together(card: ModelCard) -> None:
    """The fields that must agree: one mean and std per input channel, a bounded input."""
    channels = card.input_shape[0]
    if len(card.mean) != channels or len(card.std) != channels:
        raise ValueError(
            f"model card: mean and std need one value per input channel ({channels}), "
            f"got {len(card.mean)} and {len(card.std)}"
        )
    if math.prod(card.input_shape) > MAX_INPUT_ELEMENTS:
        raise ValueError(f"model card: input_shape {card.input_shape} holds more than {MAX_INPUT_ELEMENTS:,} values")
