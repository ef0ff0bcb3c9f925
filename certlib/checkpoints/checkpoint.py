"""Checkpoints as model cards: the weights plus a JSON card of everything needed to certify
the model correctly (its smoothing noise, sigma, DSSN seed and q, dataset, input shape).

A checkpoint file holds only tensors and strings, ``{"card": <JSON str>, "state_dict": {...}}``,
so it loads with ``torch.load(path, weights_only=True)``: no pickled code (within the bounds
``certlib.checkpoints.weights`` checks). A ``.safetensors`` checkpoint holds the same weights
with the card JSON in the header's metadata (``certlib_card``), so ``read_card`` reads the header
alone, without loading a tensor. Files are written atomically (temporary name, fsync, rename).
Reading a card never runs code; building the model does where its card names a ``factory:``
architecture, and only for a module the caller trusts (``trust_code``,
``certlib.checkpoints.trust``). Loading checks the card (``certlib.checkpoints.card``), the
caller's consent, the weights' SHA-256 and, when a certification is requested, that the card
matches it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

import certlib
from certlib.atomic import atomic_write
from certlib.checkpoints.card import CARD_FORMAT, ModelCard
from certlib.checkpoints.trust import require_consent
from certlib.checkpoints.weights import (
    CARD_METADATA_KEY,
    build_architecture,
    check_state,
    is_safetensors,
    read_weights,
    safetensors_header,
    shapes_of,
    strict_load,
)
from certlib.families import family

__all__ = [
    "CARD_FORMAT",
    "CardMismatch",
    "ModelCard",
    "check_card",
    "load_checkpoint",
    "read_card",
    "save_checkpoint",
    "verify_checkpoint",
    "weights_sha256",
]


class CardMismatch(ValueError):
    """The checkpoint's card does not match the requested certification."""


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the state dict's names, dtypes, shapes and raw bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # reshape: a 0-dim buffer (BatchNorm's num_batches_tracked) cannot be viewed as bytes.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(path: str | Path, model: torch.nn.Module, card: ModelCard) -> ModelCard:
    """Write ``model``'s weights with ``card`` (its ``weights_sha256`` filled in) atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    card = dataclasses.replace(card, weights_sha256=weights_sha256(state), library_version=certlib.__version__)
    if is_safetensors(path):
        from safetensors.torch import save

        # clone: safetensors refuses tensors that share storage (tied weights)
        data = save({k: v.clone() for k, v in state.items()}, metadata={CARD_METADATA_KEY: card.to_json()})
        atomic_write(path, lambda handle: handle.write(data))
    else:
        atomic_write(path, lambda handle: torch.save({"card": card.to_json(), "state_dict": state}, handle))
    return card


def read_card(path: str | Path) -> ModelCard:
    """The card of a checkpoint, validated, without building the model (of a ``.safetensors``
    one, without loading any tensor: the card is in its header). Runs no code of the file's."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_safetensors(path):
        return _card(path, _safetensors_card(path))
    return _load(path)[0]


def _card(path: Path, text: Any) -> ModelCard:
    try:
        return ModelCard.from_json(text)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _safetensors_card(path: Path) -> Any:
    card = safetensors_header(path).get("__metadata__", {}).get(CARD_METADATA_KEY)
    if card is None:
        raise ValueError(
            f"{path} is not a certlib checkpoint: it has no model card (import it with certify import-model)"
        )
    return card


def _load(path: str | Path) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """The checkpoint's card (validated) and state dict (a mapping of names to tensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_safetensors(path):
        card = _card(path, _safetensors_card(path))  # a bad card is refused before a tensor is read
        state = read_weights(path)
    else:
        payload = read_weights(path)
        if not isinstance(payload, dict) or "card" not in payload:
            raise ValueError(f"{path} is not a certlib checkpoint: it has no model card")
        card, state = _card(path, payload["card"]), payload.get("state_dict")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path}: its state_dict is not a mapping of names to tensors")
    return card, state


def check_card(
    card: ModelCard,
    *,
    method: str | None = None,
    sigma: float | None = None,
    seed: int | None = None,
    q: int | None = None,
    dataset: str | None = None,
    training: str | None = None,
) -> list[str]:
    """Differences between the card and a requested certification, one readable string each.

    Method, sigma, dataset and training always count; the family names what else must match
    (``card_keys``: a DSSN certificate is only meaningful with the offset vector v, i.e. the
    seed, and the q the model was trained with).
    """
    problems = []
    if method is not None and method != card.method:
        problems.append(f"noise: trained with {card.method!r}, certifying with {method!r}")
    if sigma is not None and not math.isclose(sigma, card.sigma, rel_tol=1e-9, abs_tol=1e-12):
        problems.append(f"sigma: trained at {card.sigma}, certifying at {sigma}")
    if dataset is not None and dataset != card.dataset:
        problems.append(f"dataset: trained on {card.dataset!r}, certifying on {dataset!r}")
    if training is not None and training != card.training:
        problems.append(f"training: the model had {card.training!r} training, the sweep expects {training!r}")
    requested = {"seed": seed, "q": q}
    for key in family(method or card.method).card_keys:
        if requested[key] is not None and requested[key] != getattr(card, key):
            problems.append(
                f"{key}: the {method or card.method} model was trained with {key} {getattr(card, key)}, "
                f"certifying with {requested[key]}"
            )
    return problems


def _checked(
    path: str | Path, trust_code: Iterable[str], override: bool, expected: dict[str, Any]
) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """The card and state dict of a checkpoint that may be built: its card valid and, where it
    names code, trusted; its input shape and class count the requested ones (never overridden:
    the model could not run on those images); its card matching the rest of ``expected``
    (unless ``override``); its weights hashing to the card's SHA-256."""
    card, state = _load(path)
    require_consent(card.architecture, trust_code, str(path))
    input_shape, num_classes = expected.pop("input_shape", None), expected.pop("num_classes", None)
    if input_shape is not None and list(input_shape) != card.input_shape:
        raise ValueError(
            f"{path}: the model takes inputs of shape {tuple(card.input_shape)}, the images are {tuple(input_shape)}"
        )
    if num_classes is not None and num_classes != card.num_classes:
        raise ValueError(f"{path}: the model has {card.num_classes} classes, the dataset {num_classes}")
    problems = check_card(card, **expected)
    if problems and not override:
        raise CardMismatch(
            f"{path}: the model card does not match the certification: "
            + "; ".join(problems)
            + " (pass override to certify anyway)"
        )
    digest = weights_sha256(state)
    if digest != card.weights_sha256:
        raise ValueError(
            f"{path}: weights hash {digest[:12]}… does not match the card's {card.weights_sha256[:12]}…: "
            "the file is corrupt"
        )
    return card, state


def load_checkpoint(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    override: bool = False,
    trust_code: Iterable[str] = (),
    **expected: Any,
) -> tuple[torch.nn.Module, ModelCard]:
    """The model (in eval mode on ``device``) and its card.

    ``expected`` may name method, sigma, seed, q, dataset and training of the intended
    certification; a mismatch raises CardMismatch naming every differing field unless
    ``override`` is set. It may name the ``input_shape`` and ``num_classes`` of the images, which
    must match. The weights must hash to the card's SHA-256. A card whose architecture is
    ``factory:<module>:<function>`` is refused (``UntrustedCode``, one line) unless ``trust_code``
    names the module: building it imports the module and calls the function.
    """
    card, state = _checked(path, trust_code, override, expected)
    model = build_architecture(
        card.architecture, card.num_classes, card.mean, card.std, card.input_shape, trust_code=trust_code
    )
    strict_load(model, state, str(path), card.num_classes)
    return model.to(device).eval(), card


def verify_checkpoint(
    path: str | Path, *, override: bool = False, trust_code: Iterable[str] = (), **expected: Any
) -> ModelCard:
    """Everything ``load_checkpoint`` checks (the card, consent, the weights' hash, every key
    and shape against the architecture), without building a model per file: the architecture's
    shapes are built once per kind of model. What ``certify plan`` checks of every checkpoint."""
    card, state = _checked(path, trust_code, override, expected)
    shapes = _architecture_shapes(card.architecture, card.num_classes, tuple(card.input_shape), tuple(trust_code))
    check_state(dict(shapes), state, str(path), card.num_classes)
    return card


@functools.lru_cache(maxsize=8)
def _architecture_shapes(
    architecture: str, num_classes: int, input_shape: tuple[int, ...], trust_code: tuple[str, ...]
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    channels = input_shape[0]
    model = build_architecture(
        architecture, num_classes, [0.0] * channels, [1.0] * channels, list(input_shape), trust_code=trust_code
    )
    return tuple(shapes_of(model).items())
