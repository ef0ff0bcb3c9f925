"""Hostile and careless checkpoints, weight files and model cards (issue 26, items 2 and 7).

A corpus of malformed files, each run through ``certify plan``, ``certify submit-job`` and
(weight files) ``certify import-model``: every one must be refused with one line and exit code 2,
with nothing written and nothing started; the valid files must be accepted. Loading or building
a model whose card names a ``factory:`` architecture runs code: only with the user's consent,
by module name (``models.trust_code``, ``trust_code=``). Only the user's own modules are shipped
with a job.

``python -m tests.test_hostile_checkpoints`` prints the table "tried / refused with one line /
accepted / traceback" of the corpus for the code it imports (the closing note of issue 26 has
it for the code before and after).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import random
import resource
import struct
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from certlib.checkpoints.checkpoint import ModelCard, save_checkpoint
from certlib.checkpoints.weights import build_architecture
from certlib.data import DATASETS

DIGITS = DATASETS["digits"]
GOOD = "good"  # the corpus's valid files: accepted by every command


# --------------------------------------------------------------------------- the corpus


def digits_net(num_classes: int = 10) -> nn.Module:
    """The network ``certify import-model --layout factory`` builds for the weight files."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, num_classes))


def _card(architecture: str = "small_cnn") -> ModelCard:
    return ModelCard(
        architecture,
        "digits",
        [str(i) for i in range(10)],
        list(DIGITS.input_shape),
        list(DIGITS.mean),
        list(DIGITS.std),
        DIGITS.q,
        "gaussian",
        0.5,
        None,
        None,
        0,
        "standard",
    )


def _model(architecture: str = "small_cnn") -> nn.Module:
    torch.manual_seed(0)
    return build_architecture(architecture, 10, list(DIGITS.mean), list(DIGITS.std), list(DIGITS.input_shape))


def _safetensors_parts(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _write_safetensors(path: Path, header: Any, tensors: bytes, length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + tensors)
    return path


def _valid_safetensors(directory: Path, name: str = "valid.safetensors") -> Path:
    path = directory / name
    save_checkpoint(path, _model(), _card())
    return path


def _with_header(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path, Path], Path]:
    """A builder: the valid safetensors checkpoint with its header changed by ``change``."""

    def build(directory: Path, path: Path) -> Path:
        header, tensors = _safetensors_parts(_valid_safetensors(directory, "base.safetensors"))
        result = change(header)
        return _write_safetensors(path, header if result is None else result, tensors)

    return build


def _with_card(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path, Path], Path]:
    """A builder: the valid checkpoint with its card's JSON data changed by ``change`` (which
    edits the dict, or returns what to store instead of the JSON text)."""

    def build(directory: Path, path: Path) -> Path:
        header, tensors = _safetensors_parts(_valid_safetensors(directory, "base.safetensors"))
        card = json.loads(header["__metadata__"]["certlib_card"])
        result = change(card)
        header["__metadata__"]["certlib_card"] = json.dumps(card) if result is None else result
        return _write_safetensors(path, header, tensors)

    return build


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda card: card.__setitem__(field, value)


def _first_tensor(header: dict[str, Any]) -> dict[str, Any]:
    return header[next(k for k in header if k != "__metadata__")]


def _torch_file(payload: Callable[[], Any]) -> Callable[[Path, Path], Path]:
    def build(directory: Path, path: Path) -> Path:
        torch.save(payload(), path)
        return path

    return build


def _checkpoint_pt(card: Callable[[dict[str, Any]], Any] | None = None) -> Callable[[], Any]:
    """The payload of a valid ``.pt`` checkpoint, its card changed by ``card`` (as above)."""

    def payload() -> dict[str, Any]:
        model = _model()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        text = save_checkpoint_card(model)
        data = json.loads(text)
        result = card(data) if card is not None else None
        return {"card": json.dumps(data) if result is None else result, "state_dict": state}

    return payload


def save_checkpoint_card(model: nn.Module) -> str:
    """The card JSON ``save_checkpoint`` writes for ``model`` (its weights' SHA-256 filled in)."""
    from certlib.checkpoints.checkpoint import weights_sha256

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return dataclasses.replace(_card(), weights_sha256=weights_sha256(state)).to_json()


class _RunsCode:
    """Unpickling calls ``os.mkdir(marker)``: a file that would run code when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _code_pickle(directory: Path, path: Path) -> Path:
    payload = _checkpoint_pt()()
    payload["extra"] = _RunsCode(directory / "CODE-RAN")
    torch.save(payload, path)
    return path


def _plain_weights(net: Callable[[], nn.Module] = digits_net) -> Callable[[Path, Path], Path]:
    def build(directory: Path, path: Path) -> Path:
        torch.manual_seed(0)
        state = net().state_dict()
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:
            torch.save(state, path)
        return path

    return build


def _other_architecture(directory: Path, path: Path) -> Path:
    """A valid card of small_cnn over a state dict of another network (its hash on the card)."""
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    save_checkpoint(path, other, _card())
    return path


def _flipped_weight(directory: Path, path: Path) -> Path:
    header, tensors = _safetensors_parts(_valid_safetensors(directory, "base.safetensors"))
    damaged = bytearray(tensors)
    damaged[len(damaged) // 2] ^= 0x10
    return _write_safetensors(path, header, bytes(damaged))


def _truncated(directory: Path, path: Path) -> Path:
    data = _valid_safetensors(directory, "base.safetensors").read_bytes()
    path.write_bytes(data[: len(data) - 100])
    return path


def _bytes(data: bytes) -> Callable[[Path, Path], Path]:
    def build(directory: Path, path: Path) -> Path:
        path.write_bytes(data)
        return path

    return build


ZIP_BOMB_BYTES = 64 * 2**20  # what the deflated .pt below unpacks to; its file is ~70 KB


@functools.cache  # deflating 64 MB takes a third of a second, and several tests take the bomb
def _zip_bomb_bytes() -> bytes:
    """A checkpoint whose zip entries are deflated: torch's loader inflates them (a 70 KB file
    holding 64 MB of zeros; the ratio is the attacker's)."""
    payload = _checkpoint_pt()()
    payload["padding"] = torch.zeros(ZIP_BOMB_BYTES // 4)
    plain, bomb = io.BytesIO(), io.BytesIO()
    torch.save(payload, plain)
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for info in source.infolist():
            out.writestr(info.filename, source.read(info.filename))
    return bomb.getvalue()


def _zip_bomb(directory: Path, path: Path) -> Path:
    path.write_bytes(_zip_bomb_bytes())
    return path


def _expanded_tensor(directory: Path, path: Path) -> Path:
    """A 2 KB checkpoint holding a view of 2**31 floats over a 4-byte storage (stride 0): a copy
    of it (hashing the weights makes one) takes 8 GB."""
    payload = _checkpoint_pt()()
    payload["state_dict"]["1.net.0.bias"] = torch.zeros(1).expand(2**31)
    torch.save(payload, path)
    return path


def _random(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# name -> (file suffix, builder, commands): "card" entries go through plan and submit-job, "file"
# entries through import-model too.
Builder = Callable[[Path, Path], Path]
CARD_FIELDS_WRONG_TYPE: dict[str, Any] = {
    "architecture": 5,
    "dataset": ["digits"],
    "class_names": "0123456789",
    "input_shape": "1x8x8",
    "mean": 0.5,
    "std": None,
    "q": "16",
    "method": 1,
    "lam": "x",
    "levels": 2.5,
    "seed": "0",
    "training": False,
    "hyperparameters": [],
    "epochs_done": "3",
    "clean_accuracy": "high",
    "noisy_accuracy": [1],
    "heldout": 7,
    "source": "file",
    "library_version": 0.3,
    "weights_sha256": 123,
    "format": "1",
}
CARD_FIELDS_OUT_OF_RANGE: dict[str, Any] = {
    "sigma": -0.5,
    "q": 0,
    "input_shape": [0, 8, 8],
    "mean": [0.5, 0.5],
    "std": [0.0],
    "class_names": [],
    "seed": -1,
    "levels": 0,
    "epochs_done": -1,
    "clean_accuracy": 1.5,
    "weights_sha256": "not-a-digest",
    "format": 99,
    "architecture": "no_such_net",
    "method": "no-such-noise",
}


def corpus() -> dict[str, tuple[str, Builder, str]]:
    entries: dict[str, tuple[str, Builder, str]] = {
        f"{GOOD}: safetensors checkpoint": (
            ".safetensors",
            lambda d, p: save_checkpoint(p, _model(), _card()) and p,
            "card",
        ),
        f"{GOOD}: .pt checkpoint": (".pt", _torch_file(_checkpoint_pt()), "card"),
        "card stored as a dict (.pt)": (".pt", _torch_file(_checkpoint_pt(lambda c: c)), "card"),
        "card stored as a dict (safetensors)": (".safetensors", _with_header(_card_as_dict), "card"),
        "sigma as a string": (".safetensors", _with_card(_set("sigma", "0.5")), "card"),
        "sigma null": (".safetensors", _with_card(_set("sigma", None)), "card"),
        "sigma NaN": (".safetensors", _with_card(_set("sigma", float("nan"))), "card"),
        "sigma 1e400 (infinite)": (".safetensors", _with_card(lambda c: _raw_json(c, "sigma", "1e400")), "card"),
        "seed of 5000 digits": (".safetensors", _with_card(lambda c: _raw_json(c, "seed", "9" * 5000)), "card"),
        "unknown card field": (".safetensors", _with_card(_set("favourite_colour", "blue")), "card"),
        "missing card field": (".safetensors", _with_card(lambda c: c.pop("sigma") and None), "card"),
        "card not JSON": (".safetensors", _with_card(lambda c: "{sigma: 0.5"), "card"),
        "card a JSON list": (".safetensors", _with_card(lambda c: "[1, 2]"), "card"),
        "card nested 100000 deep": (".safetensors", _with_card(lambda c: _nested(100_000)), "card"),
        "card of 8 MB": (".safetensors", _with_card(lambda c: c.__setitem__("heldout", "x" * 8 * 2**20)), "card"),
        "card input shape not the dataset's": (
            ".safetensors",
            _with_card(lambda c: c.update(input_shape=[3, 8, 8], mean=[0.5] * 3, std=[0.25] * 3)),
            "card",
        ),
        "card naming 1000 classes": (
            ".safetensors",
            _with_card(_set("class_names", [str(i) for i in range(1000)])),
            "card",
        ),
        "no card (.pt state dict)": (".pt", _plain_weights(), "card"),
        "no card (safetensors)": (".safetensors", _plain_weights(), "card"),
        "state_dict not a dict (.pt)": (
            ".pt",
            _torch_file(lambda: {**_checkpoint_pt()(), "state_dict": [1, 2]}),
            "card",
        ),
        "state_dict value not a tensor (.pt)": (
            ".pt",
            _torch_file(lambda: _replace_state(lambda s: {**s, "1.net.0.bias": "zero"})),
            "card",
        ),
        "payload a list (.pt)": (".pt", _torch_file(lambda: [1, 2, 3]), "file"),
        "header a list": (".safetensors", _with_header(lambda h: [h]), "file"),
        "header a number": (".safetensors", _with_header(lambda h: 5), "file"),
        "data_offsets missing": (
            ".safetensors",
            _with_header(lambda h: _first_tensor(h).pop("data_offsets") and None),
            "file",
        ),
        "data_offsets a string": (
            ".safetensors",
            _with_header(lambda h: _first_tensor(h).update(data_offsets="0,4")),
            "file",
        ),
        "data_offsets past the end": (
            ".safetensors",
            _with_header(lambda h: _first_tensor(h).update(data_offsets=[0, 2**40])),
            "file",
        ),
        "tensor entry a string": (".safetensors", _with_header(lambda h: h.update({"x": "tensor"})), "file"),
        "shape negative": (".safetensors", _with_header(lambda h: _first_tensor(h).update(shape=[-1, 4])), "file"),
        "dtype unknown": (".safetensors", _with_header(lambda h: _first_tensor(h).update(dtype="Q9")), "file"),
        "__metadata__ a list": (".safetensors", _with_header(lambda h: h.update(__metadata__=["x"])), "file"),
        "__metadata__ a string": (".safetensors", _with_header(lambda h: h.update(__metadata__="x")), "file"),
        "header length larger than the file": (".safetensors", _header_length(2**20), "file"),
        "header length 2**63": (".safetensors", _header_length(2**63), "file"),
        "header not UTF-8": (".safetensors", _raw_header(b"\xff\xfe{}\x00"), "file"),
        "truncated safetensors": (".safetensors", _truncated, "file"),
        "a weight byte flipped (safetensors)": (".safetensors", _flipped_weight, "card"),
        "text file (.pt)": (".pt", _bytes(b"epoch 1 loss 0.51\nepoch 2 loss 0.43\n" * 20), "file"),
        "text file (.safetensors)": (".safetensors", _bytes(b"epoch 1 loss 0.51\nepoch 2 loss 0.43\n" * 20), "file"),
        "random bytes (.pt)": (".pt", _bytes(_random(4096, 1)), "file"),
        "random bytes (.safetensors)": (".safetensors", _bytes(_random(4096, 2)), "file"),
        "empty file (.pt)": (".pt", _bytes(b""), "file"),
        "empty file (.safetensors)": (".safetensors", _bytes(b""), "file"),
        "pickle that would run code (.pt)": (".pt", _code_pickle, "file"),
        "state dict of another architecture (.pt)": (".pt", _other_architecture, "file"),
        "state dict of another architecture (safetensors)": (".safetensors", _other_architecture, "file"),
        "zip bomb .pt (deflated, 64 MB of zeros)": (".pt", _zip_bomb, "file"),
        "tensor view of 8 GB over 4 bytes (.pt)": (".pt", _expanded_tensor, "file"),
        "untrusted factory: factory:json:JSONDecoder": (
            ".safetensors",
            _with_card(_set("architecture", "factory:json:JSONDecoder")),
            "card",
        ),
        "untrusted factory: factory:os:getcwd": (
            ".safetensors",
            _with_card(_set("architecture", "factory:os:getcwd")),
            "card",
        ),
        "untrusted factory: the user's module": (
            ".safetensors",
            _with_card(_set("architecture", "factory:tests.test_hostile_checkpoints:digits_net")),
            "card",
        ),
    }
    for field, value in CARD_FIELDS_WRONG_TYPE.items():
        entries[f"card field of the wrong type: {field}"] = (".safetensors", _with_card(_set(field, value)), "card")
    for field, value in CARD_FIELDS_OUT_OF_RANGE.items():
        entries[f"card field out of range: {field}"] = (".safetensors", _with_card(_set(field, value)), "card")
    entries[f"{GOOD}: weights file (.pt)"] = (".pt", _plain_weights(), "import")
    entries[f"{GOOD}: weights file (safetensors)"] = (".safetensors", _plain_weights(), "import")
    entries["weights of another architecture (.pt)"] = (".pt", _plain_weights(lambda: nn.Linear(64, 10)), "import")
    return entries


def _card_as_dict(header: dict[str, Any]) -> None:
    header["__metadata__"]["certlib_card"] = json.loads(header["__metadata__"]["certlib_card"])


def _raw_json(card: dict[str, Any], field: str, literal: str) -> str:
    """The card's JSON with ``field`` written as ``literal`` (what json.dumps cannot write)."""
    card[field] = "@@@"
    return json.dumps(card).replace('"@@@"', literal)


def _replace_state(change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    payload = _checkpoint_pt()()
    payload["state_dict"] = change(payload["state_dict"])
    return payload


def _header_length(length: int) -> Builder:
    def build(directory: Path, path: Path) -> Path:
        header, tensors = _safetensors_parts(_valid_safetensors(directory, "base.safetensors"))
        return _write_safetensors(path, header, tensors, length=length)

    return build


def _raw_header(raw: bytes) -> Builder:
    def build(directory: Path, path: Path) -> Path:
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
        return path

    return build


# --------------------------------------------------------------------------- running the commands


class Reached(Exception):
    """``certify submit-job`` got past its validation to connecting to Ray: accepted."""


COMMANDS = ("plan", "submit-job", "import-model")
FACTORY = "tests.test_hostile_checkpoints:digits_net"


def _spec(directory: Path, checkpoint: Path, trust: list[str] | None = None) -> Path:
    models: dict[str, Any] = {"path": str(checkpoint)}
    if trust is not None:
        models["trust_code"] = trust
    spec = {
        "name": "hostile",
        "output": str(directory / "out"),
        "dataset": {"name": "digits", "limit": 10},
        "models": models,
        "methods": ["gaussian"],
        "sigmas": [0.5],
        "certify": {"n0": 16, "n": 100},
        "resources": {"shard_size": 5},
    }
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def invoke(command: str, directory: Path, path: Path, monkeypatch=None) -> Any:
    """Run ``command`` on the file ``path`` as a user would (the command line, in-process)."""
    from cluster.cli import main
    from cluster.client import submission

    if command == "import-model":
        args = ["import-model", FACTORY, "--layout", "factory", "--weights", str(path), "--dataset", "digits"]
        args += ["--trained-with", "gaussian", "--sigma", "0.5", "-o", str(directory / "imported.safetensors")]
    elif command == "plan":
        args = ["plan", str(_spec(directory, path)), "--rate", "1000", "--format", "json"]
    else:
        args = ["submit-job", str(_spec(directory, path))]

    def reached(*args, **kwargs):
        raise Reached()

    saved = submission.connect
    submission.connect = reached
    try:
        return CliRunner().invoke(main, args)
    finally:
        submission.connect = saved


def outcome(result: Any) -> str:
    """``accepted``, ``one line`` (exit code 2 and one line of error), ``traceback`` (an
    exception escaped the command) or ``other`` (a refusal of several lines, another code)."""
    if isinstance(result.exception, Reached) or result.exit_code == 0:
        return "accepted"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return "traceback"
    lines = result.stderr.strip().splitlines()
    if result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "):
        return "one line"
    return "other"


def commands_for(kind: str) -> tuple[str, ...]:
    return {"card": COMMANDS[:2], "file": COMMANDS, "import": COMMANDS[2:]}[kind]


def build(name: str, directory: Path) -> Path:
    suffix, builder, _ = corpus()[name]
    directory.mkdir(parents=True, exist_ok=True)
    return builder(directory, directory / f"model{suffix}")


def _table(rows: list[tuple[str, str, str, float, float]]) -> str:
    """The closing table: per command, files tried, refused with one line, accepted, traceback."""
    lines = ["| command | tried | refused with one line | accepted | traceback | other | slowest | peak RSS |"]
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for command in COMMANDS:
        mine = [r for r in rows if r[1] == command]
        count = {o: sum(1 for r in mine if r[2] == o) for o in ("one line", "accepted", "traceback", "other")}
        lines.append(
            f"| {command} | {len(mine)} | {count['one line']} | {count['accepted']} | {count['traceback']} "
            f"| {count['other']} | {max(r[3] for r in mine):.1f} s | {max(r[4] for r in mine):.0f} MB |"
        )
    return "\n".join(lines)


def main(root: Path) -> None:
    """Every corpus file through its commands; prints each outcome and the table."""
    rows = []
    for i, (name, (_, _, kind)) in enumerate(corpus().items()):
        for command in commands_for(kind):
            directory = root / f"{i:03d}-{command}"
            path = build(name, directory)
            before = set(directory.rglob("*"))
            started = time.perf_counter()
            result = invoke(command, directory, path)
            seconds = time.perf_counter() - started
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            written = sorted(str(p.relative_to(directory)) for p in set(directory.rglob("*")) - before)
            written = [w for w in written if w != "spec.yaml"]
            got = outcome(result)
            message = (result.stderr or result.stdout).strip().splitlines()[:1] or [repr(result.exception)]
            if result.exception is not None and got == "traceback":
                message = [f"{type(result.exception).__name__}: {str(result.exception)[:100]}"]
            print(f"{name} | {command} | {got} | {seconds:.2f} s | wrote {written} | {message[0][:160]}", flush=True)
            rows.append((name, command, got, seconds, rss))
    print()
    print(_table([r for r in rows if not r[0].startswith(GOOD)]))
    print("valid files:", [(r[0], r[1], r[2]) for r in rows if r[0].startswith(GOOD)])


# --------------------------------------------------------------------------- the corpus, refused


HOSTILE = [
    (name, command)
    for name, (_, _, kind) in corpus().items()
    if not name.startswith(GOOD)
    for command in commands_for(kind)
]
VALID = [
    (name, command)
    for name, (_, _, kind) in corpus().items()
    if name.startswith(GOOD)
    for command in commands_for(kind)
]
# What the one line must say, for the files whose refusal is easy to get wrong.
SAYS = {
    "pickle that would run code (.pt)": "would run pickled code (it calls posix.mkdir",
    "text file (.pt)": "not a PyTorch weights file",
    "random bytes (.pt)": "not a PyTorch weights file",
    "empty file (.pt)": "empty file",
    "zip bomb .pt (deflated, 64 MB of zeros)": "is compressed",
    "tensor view of 8 GB over 4 bytes (.pt)": "larger than its storage",
    "a weight byte flipped (safetensors)": "does not match the card",
    "state dict of another architecture (.pt)": "missing keys",
    "card input shape not the dataset's": "takes inputs of shape (3, 8, 8), the images are (1, 8, 8)",
    "card naming 1000 classes": "1000 classes, the dataset 10",
    "untrusted factory: factory:json:JSONDecoder": "standard library",
    "untrusted factory: the user's module": "models.trust_code: [tests.test_hostile_checkpoints]",
    "card stored as a dict (.pt)": "stored as a dict",
    "sigma as a string": "sigma: must be a finite number, got '0.5'",
    "sigma null": "sigma: must be a finite number, got None",
    "header a list": "its header is a list, not a mapping",
    "data_offsets a string": "data_offsets '0,4' is not [begin, end]",
    "data_offsets past the end": "past the end",
    "tensor entry a string": "tensor 'x': not a mapping",
    "dtype unknown": "dtype 'Q9'",
    "truncated safetensors": "truncated safetensors file",
}
HEADER_LEVEL = [  # the safetensors files whose header is malformed
    name
    for name, (suffix, _, kind) in corpus().items()
    if suffix == ".safetensors" and kind == "file" and not name.startswith("state dict")
]


def _written(directory: Path, before: set[Path]) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in set(directory.rglob("*")) - before if p.name != "spec.yaml")


@pytest.mark.parametrize("name, command", HOSTILE, ids=[f"{c}: {n}" for n, c in HOSTILE])
def test_every_malformed_file_is_refused_with_one_line_and_nothing_written(tmp_path, name, command):
    path = build(name, tmp_path)
    before = set(tmp_path.rglob("*"))
    started = time.perf_counter()
    result = invoke(command, tmp_path, path)
    assert outcome(result) == "one line", (result.output, result.exception)
    assert result.exit_code == 2 and time.perf_counter() - started < 30
    assert _written(tmp_path, before) == []
    assert not (tmp_path / "CODE-RAN").exists()
    assert SAYS.get(name, "") in result.stderr
    if command != "import-model":
        assert "models.path: " in result.stderr and str(path) in result.stderr  # the field and the file


@pytest.mark.parametrize("name, command", VALID, ids=[f"{c}: {n}" for n, c in VALID])
def test_the_valid_files_are_accepted(tmp_path, name, command):
    result = invoke(command, tmp_path, build(name, tmp_path))
    assert outcome(result) == "accepted", (result.output, result.exception)


@pytest.mark.parametrize("name", HEADER_LEVEL)
def test_reading_a_card_checks_the_whole_safetensors_header(tmp_path, name):
    """``read_card`` reads a safetensors header only (what ``certify status`` and the plan's
    first look use): it refuses every malformed header in one line, without the library's
    loader to catch what it misses."""
    from certlib.checkpoints.checkpoint import read_card

    with pytest.raises(ValueError) as err:
        read_card(build(name, tmp_path))
    assert "\n" not in str(err.value) and SAYS.get(name, "") in str(err.value)


def test_bombs_are_refused_before_they_take_memory_or_time(tmp_path):
    """The deflated zip and the 8 GB view are refused from the file's layout and its tensors'
    storage sizes: in a fraction of a second, without allocating what they describe (the view
    is refused before hashing the weights copies it)."""
    from certlib.checkpoints.checkpoint import load_checkpoint
    from certlib.checkpoints.weights import read_weights

    for name in ("zip bomb .pt (deflated, 64 MB of zeros)", "tensor view of 8 GB over 4 bytes (.pt)"):
        path = build(name, tmp_path / name.split()[0])
        for read in (read_weights, load_checkpoint):
            started = time.perf_counter()
            with pytest.raises(ValueError, match="compressed|larger than its storage") as err:
                read(path)
            assert "\n" not in str(err.value) and time.perf_counter() - started < 5


# --------------------------------------------------------------------------- card fields


def test_card_fields_are_checked_by_type_and_range_in_one_place():
    """``ModelCard.from_json`` checks every field: a valid card round-trips, and each field of
    the wrong type or out of range is refused in one line naming it."""
    model = _model()
    good = json.loads(save_checkpoint_card(model))
    assert ModelCard.from_json(json.dumps(good)).to_json() == json.dumps(good, indent=2, sort_keys=True)
    for field, value in {**CARD_FIELDS_WRONG_TYPE, **CARD_FIELDS_OUT_OF_RANGE, "sigma": "0.5"}.items():
        with pytest.raises(ValueError, match=f"model card: ({field}|mean and std)") as err:
            ModelCard.from_json(json.dumps({**good, field: value}))
        assert "\n" not in str(err.value) and len(str(err.value)) < 200
    for text, says in [
        (good, "stored as a dict"),
        ("[]", "must be a JSON object"),
        (json.dumps(good).replace('"sigma": 0.5', '"sigma": NaN'), "NaN is not a number"),
        (_nested(50_000), "nested too deeply"),
        (json.dumps({**good, "heldout": "x" * 2**23}), "more than a card holds"),
        (json.dumps({**good, "architecture": "factory:os"}), "is not factory:<package.module>:<function>"),
        (json.dumps({**good, "architecture": "factory:a b:c"}), "is not factory:<package.module>:<function>"),
        (json.dumps({**good, "input_shape": [3, 4096, 4096], "mean": [0] * 3, "std": [1] * 3}), "holds more than"),
    ]:
        with pytest.raises(ValueError, match=says):
            ModelCard.from_json(text)


# --------------------------------------------------------------------------- code only by consent


USER_MODULE = """
import pathlib

pathlib.Path(__file__).with_name("IMPORTED").write_text("the module's top level ran")


def build(num_classes=10):
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, num_classes))
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of the user's, ``consentnet_<n>.nets`` in a package under the current directory,
    whose top level leaves a file ``IMPORTED`` when it runs; and a checkpoint whose card names
    it (``factory:consentnet_<n>.nets:build``)."""
    package = f"consentnet_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "nets.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])
    torch.manual_seed(0)
    net = digits_net()
    architecture = f"factory:{package}.nets:build"
    model = nn.Sequential(
        __import__("certlib.models", fromlist=["Standardize"]).Standardize(list(DIGITS.mean), list(DIGITS.std)), net
    )
    save_checkpoint(tmp_path / "mine.safetensors", model, _card(architecture))
    (tmp_path / package / "IMPORTED").unlink(missing_ok=True)
    yield package, tmp_path / "mine.safetensors", tmp_path / package / "IMPORTED"
    for name in [m for m in sys.modules if m.split(".")[0] == package]:
        del sys.modules[name]


def test_reading_a_card_runs_no_code(user_module):
    from certlib.checkpoints.checkpoint import read_card

    package, path, imported = user_module
    assert read_card(path).architecture == f"factory:{package}.nets:build"
    assert not imported.exists() and package not in sys.modules


def test_a_factory_is_built_only_for_a_module_trusted_by_name(user_module):
    """load_checkpoint and build_architecture refuse, before importing anything of it, a module
    the caller did not name (nor a parent package of it); they build it once named."""
    from certlib.checkpoints.checkpoint import load_checkpoint
    from certlib.checkpoints.trust import UntrustedCode
    from certlib.engine.throughput import forward_throughput

    package, path, imported = user_module
    architecture = f"factory:{package}.nets:build"
    shape, mean, std = list(DIGITS.input_shape), list(DIGITS.mean), list(DIGITS.std)
    refusals = [
        lambda: load_checkpoint(path),
        lambda: load_checkpoint(
            path,
            trust_code=["someone_else", f"{package}.other", f"{package}.ne", package[:-1], f"{package}.nets.deeper"],
        ),
        lambda: build_architecture(architecture, 10, mean, std, shape),
        lambda: forward_throughput(architecture, 10, mean, std, shape, device=torch.device("cpu"), engine={}),
    ]
    for refused in refusals:
        with pytest.raises(UntrustedCode) as err:
            refused()
        message = str(err.value)
        assert "\n" not in message and f"'{package}.nets'" in message
        assert f"models.trust_code: [{package}.nets]" in message and "trust_code=[" in message
    assert not imported.exists() and package not in sys.modules
    model, card = load_checkpoint(path, trust_code=[f"{package}.nets"])
    assert imported.exists() and card.architecture == architecture
    assert load_checkpoint(path, trust_code=[package])[1] == card  # a package trusts its modules


def test_the_standard_library_is_never_a_factory():
    from certlib.checkpoints.trust import UntrustedCode

    for architecture in ("factory:os:fork", "factory:json:JSONDecoder", "factory:builtins:breakpoint"):
        module = architecture.split(":")[1]
        with pytest.raises(UntrustedCode, match="a module of the standard library"):
            build_architecture(architecture, 10, [0.5], [0.25], [1, 8, 8], trust_code=[module])


def test_the_spec_names_each_trusted_module(tmp_path):
    from cluster.spec import SpecError, parse_spec

    base = {
        "name": "trust",
        "output": str(tmp_path / "out"),
        "dataset": {"name": "digits"},
        "methods": ["gaussian"],
        "sigmas": [0.5],
    }
    for trusted, says in [
        (["*"], r"models\.trust_code\[0\]: must be a module name"),
        (["mypkg.*"], r"models\.trust_code\[0\]: must be a module name"),
        ([""], r"models\.trust_code\[0\]: must be a module name"),
        (["os"], r"models\.trust_code\[0\]: 'os' is a module of the standard library"),
        ([True], r"models\.trust_code\[0\]: must be a module name"),
        ("mypkg", r"models\.trust_code: must be a"),
        (["mypkg", "mypkg"], "duplicates"),
    ]:
        with pytest.raises(SpecError, match=says):
            parse_spec({**base, "models": {"path": "m.pt", "trust_code": trusted}})
    sweep = parse_spec({**base, "models": {"path": "m.pt", "trust_code": ["mypkg.nets", "other"]}})
    assert sweep.models.trust_code == ("mypkg.nets", "other")
    assert type(sweep).from_json(sweep.to_json()) == sweep  # and the job's driver reads it back


def test_plan_refuses_an_untrusted_factory_and_plans_a_trusted_one(user_module):
    package, path, imported = user_module
    from cluster.cli import main

    refused = CliRunner().invoke(main, ["plan", str(_spec(path.parent, path)), "--rate", "1000"])
    assert outcome(refused) == "one line" and f"models.trust_code: [{package}.nets]" in refused.stderr
    assert not imported.exists() and package not in sys.modules
    planned = CliRunner().invoke(main, ["plan", str(_spec(path.parent, path, [package])), "--format", "json"])
    assert planned.exit_code == 0, planned.output
    assert imported.exists()  # built to check the weights and to measure its speed, by consent


def test_a_worker_refuses_an_untrusted_factory(user_module):
    """A remote cluster's files are checked by the job, not by submit-job: the worker asks too."""
    from certlib.checkpoints.trust import UntrustedCode
    from cluster.job.worker import UnitRunner
    from cluster.plan import model_keys
    from cluster.spec import load_spec

    package, path, imported = user_module
    runner = UnitRunner(load_spec(_spec(path.parent, path)).to_json(), "job")
    key = model_keys(runner.sweep)[0]
    with pytest.raises(UntrustedCode, match="models.trust_code"):
        runner._load(key)
    with pytest.raises(UntrustedCode, match="models.trust_code"):
        runner.calibrate(f"factory:{package}.nets:build", seconds=0.01)
    assert not imported.exists()
    trusted = UnitRunner(load_spec(_spec(path.parent, path, [f"{package}.nets"])).to_json(), "job")
    assert trusted._load(key)[1].architecture == f"factory:{package}.nets:build"


def test_the_current_directory_never_shadows_an_installed_module(tmp_path, monkeypatch):
    """A user's factory module is looked up in the current directory after everything else: a
    ``yaml.py`` there (a downloaded model's directory, say) is not what ``import yaml`` finds."""
    from certlib.checkpoints.trust import importable_from_here

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    importable_from_here()
    assert sys.path[-1] == str(tmp_path)
    (tmp_path / "yaml.py").write_text("raise SystemExit('the current directory shadowed yaml')")
    import importlib.util

    assert Path(importlib.util.find_spec("yaml").origin).parent != tmp_path


def test_import_model_takes_the_named_module_as_consent(tmp_path, monkeypatch):
    """``certify import-model SOURCE --layout factory`` names the module on the user's own
    command line: no other consent; loading the checkpoint it wrote needs one again."""
    from certlib.checkpoints.checkpoint import load_checkpoint
    from certlib.checkpoints.trust import UntrustedCode

    result = invoke("import-model", tmp_path, build(f"{GOOD}: weights file (.pt)", tmp_path))
    assert outcome(result) == "accepted", result.output
    with pytest.raises(UntrustedCode):
        load_checkpoint(tmp_path / "imported.safetensors")
    assert (
        load_checkpoint(tmp_path / "imported.safetensors", trust_code=["tests"])[1].architecture == f"factory:{FACTORY}"
    )


# --------------------------------------------------------------------------- what a job uploads


def _sweep_of(path: Path, trust: list[str]) -> Any:
    from cluster.spec import load_spec

    return load_spec(_spec(path.parent, path, trust))


def _factory_checkpoint(directory: Path, architecture: str) -> Path:
    """A checkpoint whose card names ``architecture`` (its weights are never loaded here)."""
    path = directory / "m.safetensors"
    save_checkpoint(path, _model(), _card())
    header, tensors = _safetensors_parts(path)
    card = json.loads(header["__metadata__"]["certlib_card"])
    header["__metadata__"]["certlib_card"] = json.dumps({**card, "architecture": architecture})
    return _write_safetensors(path, header, tensors)


def test_only_the_users_own_trusted_modules_are_uploaded(tmp_path, monkeypatch):
    """Shipped: a trusted module under the current directory or a PYTHONPATH entry the user set.
    Not shipped: one installed in site-packages (the workers have their own), one found
    elsewhere (said in a notice). Refused in one line: the standard library, an untrusted one."""
    from certlib.checkpoints.trust import UntrustedCode
    from cluster.client.submission import user_modules

    here, elsewhere, stray = tmp_path / "project", tmp_path / "lib", tmp_path / "stray"
    for directory, name in ((here, "mine_here"), (elsewhere, "mine_on_path"), (stray, "mine_stray")):
        (directory / name).mkdir(parents=True)
        (directory / name / "__init__.py").write_text("raise SystemExit('imported while finding it')")
    monkeypatch.chdir(here)
    monkeypatch.setenv("PYTHONPATH", str(elsewhere))
    monkeypatch.setattr(sys, "path", [*sys.path, str(elsewhere), str(stray)])
    cases = [
        ("mine_here", [str(here / "mine_here")], []),
        ("mine_on_path", [str(elsewhere / "mine_on_path")], []),
        ("mine_stray", [], ["not shipping mine_stray"]),
        ("yaml", [], []),  # site-packages
    ]
    for module, shipped, notices in cases:
        said: list[str] = []
        path = _factory_checkpoint(tmp_path, f"factory:{module}:build")
        assert user_modules(_sweep_of(path, [module]), notice=said.append) == shipped, module
        assert [n[: len(notices[0])] for n in said] == notices if notices else said == []
    with pytest.raises(UntrustedCode, match="models.trust_code: \\[mine_here\\]"):
        user_modules(_sweep_of(_factory_checkpoint(tmp_path, "factory:mine_here:build"), ["other"]))
    for architecture in ("factory:json:JSONDecoder", "factory:email.parser:Parser"):
        with pytest.raises(ValueError, match="standard library") as err:
            user_modules(_sweep_of(_factory_checkpoint(tmp_path, architecture), []))
        assert "\n" not in str(err.value)


def test_a_standard_library_module_is_never_uploaded_whatever_its_name(tmp_path, monkeypatch):
    """The location counts too: a module whose file lies in the standard library's directory."""
    from cluster.client import submission

    assert submission._module_source("mine_absent_anywhere") is None
    with pytest.raises(ValueError, match="standard library"):
        submission._module_source("json")
    import certlib.checkpoints.trust as trust

    monkeypatch.setattr(trust, "standard_library", lambda name: False)
    with pytest.raises(ValueError, match="standard library"):
        submission._module_source("json")  # found in the standard library's directory


def test_submit_refuses_before_anything_starts(tmp_path, monkeypatch):
    """For a remote cluster preflight does not read the files, but the card of a checkpoint
    readable here is: an untrusted factory is refused before connecting (nothing started)."""
    from cluster.client import submission

    path = _factory_checkpoint(tmp_path, "factory:mine_remote:build")
    monkeypatch.setattr(submission, "connect", lambda *a, **k: pytest.fail("connected"))
    with pytest.raises(ValueError, match="models.trust_code: \\[mine_remote\\]"):
        submission.submit(_spec(tmp_path, path), "http://head.example:8265")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="hostile-checkpoints-") as tmp:
        main(Path(tmp))
