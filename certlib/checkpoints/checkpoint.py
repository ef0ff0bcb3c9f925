"""Checkpoints as model cards: the weights plus a JSON card of everything needed to certify
the model correctly (its smoothing noise, sigma, DSSN seed and q, dataset, input shape).

A checkpoint file holds only tensors and strings, ``{"card": <JSON str>, "state_dict": {...}}``,
so it loads with ``torch.load(path, weights_only=True)``: no pickled code. A ``.safetensors``
checkpoint holds the same weights with the card JSON in the header's metadata
(``certlib_card``), so ``read_card`` reads the header alone, without loading a tensor. Files are
written atomically (temporary name, fsync, rename). Loading verifies the weights' SHA-256 and,
when a certification is requested, that the card matches it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import certlib
from certlib.atomic import atomic_write
from certlib.families import family

if TYPE_CHECKING:
    from certlib.data import QuantizedDataset
    from certlib.families import SmoothingNoise
from certlib.checkpoints.weights import (
    CARD_METADATA_KEY,
    build_architecture,
    is_safetensors,
    read_weights,
    safetensors_header,
    strict_load,
)

CARD_FORMAT = 1


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
        cls, architecture: str, images: QuantizedDataset, noise: SmoothingNoise, *, seed: int, training: str, **fields: Any
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
    def from_json(cls, text: str) -> ModelCard:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model card has unknown fields {unknown}: written by a newer library?")
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"model card lacks the fields {missing}")
        return cls(**data)


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
    """The card of a checkpoint, without building the model (of a ``.safetensors`` one, without
    loading any tensor: the card is in its header)."""
    if is_safetensors(path):
        return ModelCard.from_json(_safetensors_card(path))
    return ModelCard.from_json(_load(path)["card"])


def _safetensors_card(path: str | Path) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    card = safetensors_header(path).get("__metadata__", {}).get(CARD_METADATA_KEY)
    if card is None:
        raise ValueError(
            f"{path} is not a certlib checkpoint: it has no model card (import it with certify import-model)"
        )
    return card


def _load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_safetensors(path):
        card = _safetensors_card(path)
        return {"card": card, "state_dict": read_weights(path)}
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is not ours
        raise ValueError(
            f"{path} is not a certlib checkpoint (it cannot be loaded with weights_only=True): {err}"
        ) from None
    if not isinstance(payload, dict) or "card" not in payload or "state_dict" not in payload:
        raise ValueError(f"{path} is not a certlib checkpoint: it has no model card")
    return payload


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


def load_checkpoint(
    path: str | Path, *, device: torch.device | str = "cpu", override: bool = False, **expected
) -> tuple[torch.nn.Module, ModelCard]:
    """The model (in eval mode on ``device``) and its card.

    ``expected`` may name method, sigma, seed, q, dataset and training of the intended certification; a
    mismatch raises CardMismatch naming every differing field unless ``override`` is set.
    The weights must hash to the card's SHA-256.
    """
    payload = _load(path)
    card = ModelCard.from_json(payload["card"])
    problems = check_card(card, **expected)
    if problems and not override:
        raise CardMismatch(
            f"{path}: the model card does not match the certification: "
            + "; ".join(problems)
            + " (pass override to certify anyway)"
        )
    state = payload["state_dict"]
    digest = weights_sha256(state)
    if digest != card.weights_sha256:
        raise ValueError(
            f"{path}: weights hash {digest[:12]}… does not match the card's {card.weights_sha256[:12]}…: "
            "the file is corrupt"
        )
    model = build_architecture(card.architecture, card.num_classes, card.mean, card.std, card.input_shape)
    strict_load(model, state, str(path), card.num_classes)
    return model.to(device).eval(), card
