"""Reading a spec file with bounded time and memory: its size limited before it is read, YAML
through a ``yaml.SafeLoader`` subclass (safe_load's machinery: plain data only) that counts the
values it composes, aliases expanded, and refuses before constructing anything that exceeds a
limit, nests too deep or repeats a key. Every refusal is one ``SpecError`` line.

The limits (a spec in ``jobs/`` is about 1.5 KB and 40 values; 20,000 radii are 160 KB):

* MAX_SPEC_BYTES: the file. PyYAML's Python loader reads about a megabyte in seconds.
* MAX_NODES: values composed, each alias counted as the values it repeats: 20,000 radii and
  the rest of a spec fit 2.5 times over. Time and memory grow with values more than with bytes
  (60 to 160 us and about 0.7 KB each, composed and constructed, on a loaded core), and an
  alias repeats a whole structure: nine levels of nine aliases are 387 million values in 663
  bytes.
* MAX_CHARACTERS: characters of the scalars, aliases expanded (an aliased long string).
* MAX_DEPTH: nesting; a spec nests three deep (``models.train.epochs``), and PyYAML composes
  recursively.
* MAX_INTEGER_CHARACTERS: an integer literal; none of a spec's integers has more than 20 digits,
  and Python converts longer ones in quadratic time (it refuses beyond 4,300 digits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cluster.spec.fields import QUOTE, SpecError, shown

MAX_SPEC_BYTES = 1 << 20
MAX_NODES = 50_000
MAX_CHARACTERS = MAX_SPEC_BYTES
MAX_DEPTH = 16
MAX_INTEGER_CHARACTERS = 40
MERGE_TAG = "tag:yaml.org,2002:merge"


class Refused(yaml.MarkedYAMLError):
    """A spec this loader will not read: ``problem`` says why, ``problem_mark`` where."""


class SpecLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with the limits of this module: values (aliases expanded) and their
    characters counted as they are composed, nesting bounded, duplicate keys and over-long
    integer literals refused."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.values = 0
        self.characters = 0
        self.depth = 0
        self.expanded: dict[int, tuple[int, int]] = {}  # an anchored node's values and characters

    def _count(self, values: int, characters: int, mark) -> None:
        self.values += values
        self.characters += characters
        if self.values > MAX_NODES:
            raise Refused(problem=f"more than {MAX_NODES:,} values (aliases expanded)", problem_mark=mark)
        if self.characters > MAX_CHARACTERS:
            raise Refused(
                problem=f"more than {MAX_CHARACTERS:,} characters of values (aliases expanded)", problem_mark=mark
            )

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = self.anchors.get(event.anchor)
            if node is not None:  # else the composer refuses the undefined alias
                if id(node) not in self.expanded:
                    raise Refused(
                        problem=f"the alias *{event.anchor[:QUOTE]} repeats a value that contains it",
                        problem_mark=event.start_mark,
                    )
                self._count(*self.expanded[id(node)], event.start_mark)
            return super().compose_node(parent, index)
        if self.depth >= MAX_DEPTH:
            raise Refused(problem=f"values nested more than {MAX_DEPTH} deep", problem_mark=event.start_mark)
        before = (self.values, self.characters)
        self.depth += 1
        node = super().compose_node(parent, index)
        self.depth -= 1
        self._count(1, len(node.value) if isinstance(node, yaml.ScalarNode) else 0, event.start_mark)
        if getattr(event, "anchor", None) is not None:
            self.expanded[id(node)] = (self.values - before[0], self.characters - before[1])
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):  # before merge keys are flattened: those may repeat keys
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                except TypeError:  # unhashable: SafeConstructor refuses it
                    continue
                if repeated:
                    raise Refused(problem=f"the key {shown(key)} appears twice", problem_mark=key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        if len(node.value) > MAX_INTEGER_CHARACTERS:
            raise Refused(
                problem=f"an integer of {len(node.value):,} characters (at most {MAX_INTEGER_CHARACTERS})",
                problem_mark=node.start_mark,
            )
        return super().construct_yaml_int(node)


SpecLoader.add_constructor("tag:yaml.org,2002:int", SpecLoader.construct_yaml_int)


def read_spec_text(path: Path) -> str:
    """The text of the spec file ``path``: at most MAX_SPEC_BYTES of UTF-8, its size checked
    before it is read (and again while reading: a file may grow, or not know its size)."""
    if path.is_dir():
        raise SpecError(f"{path}: a directory, not a spec file")
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    limit = f"{path}: larger than the {MAX_SPEC_BYTES:,} bytes (1 MiB) a spec may have"
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(limit)
        with path.open("rb") as file:
            data = file.read(MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise SpecError(f"{path}: cannot read the spec ({err.__class__.__name__})") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: not UTF-8 text (byte {err.start})") from None


def load_yaml(text: str, where: str) -> Any:
    """The plain data of the YAML ``text`` (``where`` names it in errors), or a one-line SpecError."""
    loader = None
    try:
        loader = SpecLoader(text)  # the reader checks the characters here
        return loader.get_single_data()
    except Refused as err:
        line = f" at line {err.problem_mark.line + 1}" if err.problem_mark else ""
        raise SpecError(f"{where}: {err.problem}{line}") from None
    except yaml.MarkedYAMLError as err:
        line = f" at line {err.problem_mark.line + 1}" if err.problem_mark else ""
        problem = " ".join(str(err.problem or "").split())
        problem = problem if len(problem) <= QUOTE else problem[:QUOTE] + "..."
        raise SpecError(f"{where}: not valid YAML{line}" + (f" ({problem})" if problem else "")) from None
    except yaml.YAMLError as err:
        reason = getattr(err, "reason", None)
        position = getattr(err, "position", None)
        detail = f" ({reason} at character {position:,})" if reason is not None else ""
        raise SpecError(f"{where}: not valid YAML{detail}") from None
    finally:
        if loader is not None:
            loader.dispose()
