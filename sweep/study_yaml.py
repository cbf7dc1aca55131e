"""Study files as YAML with line numbers: safe-loaded, bounded, every mapping key's line recorded; and
the command line's ``--set KEY=VALUE`` overrides, applied to the document before it is validated.

What the reader refuses is a :class:`StudyError` naming the file, the line and the field; a value an
override gave is located by the flag instead of a line (``study.yaml (--set fixed.iterations=x): ...``).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gradinv.errors import ConfigError
from gradinv.results.text import visible

MAX_FILE_BYTES = 1 << 20  # a study file is a few kB; even 50,000 listed image indices fit
MAX_ALIAS_VALUES = 10_000  # values that aliases may add by repeating what they refer to
MAX_SHOWN = 80  # characters of an override an error quotes


class SetFlag(str):
    """Where a value an override gave comes from, in place of its line: ``--set fixed.iterations=500``."""


class StudyError(ConfigError):
    """A mistake in a study file, located by file and line (or by the ``--set`` flag that gave the value)."""

    def __init__(self, path: Path | str, line: int | str | None, field_name: str, message: str):
        where = f"{path} ({line})" if isinstance(line, SetFlag) else f"{path}:{line}" if line else str(path)
        self.field, self.value, self.fix = field_name, None, message
        ValueError.__init__(self, f"{where}: {field_name}: {message}")


_COLLECTION_TAGS = {yaml.MappingNode: "tag:yaml.org,2002:map", yaml.SequenceNode: "tag:yaml.org,2002:seq"}
_SCALAR_TAGS = set(yaml.SafeLoader.yaml_constructors) - {None, *_COLLECTION_TAGS.values()}


class _Plain:
    """A composed YAML node as plain Python data, recording the line of every mapping key.

    Composing shares an aliased node; walking it copies it, so the copies are counted and bounded
    (a "billion laughs" file would otherwise expand to billions of values). Only the safe loader's
    tags are accepted, and a key may appear once per mapping.
    """

    def __init__(self, path: Path, lines: dict):
        self.path, self.lines = path, lines
        self.loader = yaml.SafeLoader("")
        self.seen: set[int] = set()
        self.open: set[int] = set()  # collections being walked: an alias to one of them is a cycle
        self.repeated = 0  # values walked again through aliases
        self.alias: tuple | None = None  # where the outermost alias being copied is used

    def fail(self, node: yaml.Node, where: tuple, message: str):
        self.fail_at(node.start_mark.line + 1, where, message)

    def fail_at(self, line: int | None, where: tuple, message: str):
        raise StudyError(self.path, line, ".".join(str(p) for p in where) or "study", message)

    def check_tag(self, node: yaml.Node):
        allowed = _COLLECTION_TAGS.get(type(node))
        if (node.tag != allowed) if allowed else (node.tag not in _SCALAR_TAGS):
            self.fail(node, ("yaml",), f"tag {node.tag!r} is not allowed in a study file; remove it")

    def value(self, node: yaml.Node, where: tuple) -> Any:
        if id(node) not in self.seen:
            self.seen.add(id(node))
            self.lines[where] = node.start_mark.line + 1
            return self.build(node, where)
        # An alias: it has no node of its own, so it is located where it is used (its key, or its list).
        outer = self.alias or where
        line = self.lines[where] = self.lines.get(outer) or self.lines.get(outer[:-1])
        if id(node) in self.open:
            self.fail_at(line, where, "the alias refers to itself, so it never ends; remove it")
        self.repeated += 1
        if self.repeated > MAX_ALIAS_VALUES:
            self.fail_at(line, outer, f"aliases expand to more than {MAX_ALIAS_VALUES} values in all; use fewer")
        if self.alias:
            return self.build(node, where)
        self.alias = where
        try:
            return self.build(node, where)
        finally:
            self.alias = None

    def build(self, node: yaml.Node, where: tuple) -> Any:
        self.check_tag(node)
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, where)
        self.open.add(id(node))
        if isinstance(node, yaml.MappingNode):
            result = self.mapping(node, where)
        else:
            result = [self.value(item, where + (i,)) for i, item in enumerate(node.value)]
        self.open.discard(id(node))
        return result

    def mapping(self, node: yaml.MappingNode, where: tuple) -> dict:
        result, key_lines = {}, {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.fail(key_node, where, "a key must be plain text, not a list or mapping")
            self.check_tag(key_node)
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in key_lines:
                self.fail(key_node, where + (key,), f"set twice (lines {key_lines[key]} and {line}); keep one")
            key_lines[key] = self.lines[where + (key,)] = line
            result[key] = self.value(value_node, where + (key,))
        return result

    def scalar(self, node: yaml.ScalarNode, where: tuple) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except (ValueError, TypeError, KeyError, AttributeError):  # e.g. `!!int abc`, or an int of 5,000 digits
            self.fail(node, where, f"{node.value[:40]!r} cannot be read as {node.tag.rsplit(':', 1)[-1]}; fix it")


def _text(path: Path) -> str:
    try:  # without blocking: opening a FIFO waits for a writer, and reading one or a device may never end
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise StudyError(path, None, "file", "not a regular file; give the path of a YAML file")
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise StudyError(path, None, "file", f"cannot read it ({error.strerror}); check the path") from None
    if len(data) > MAX_FILE_BYTES:
        raise StudyError(path, None, "file", f"larger than {MAX_FILE_BYTES} bytes; a study file is a few kB of YAML")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        byte = f"0x{data[error.start]:02x} at offset {error.start}"
        raise StudyError(path, None, "file", f"byte {byte} is not UTF-8; a study file must be UTF-8 text") from None


def read_yaml(path: Path) -> tuple[dict, dict]:
    text = _text(path)
    lines: dict = {}
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # composing shares aliased nodes: cheap
        document = _Plain(path, lines).value(node, ()) if node is not None else None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = (error.problem or error.context or "invalid YAML").replace("\n", " ")
        raise StudyError(path, mark.line + 1 if mark else None, "yaml", f"{problem}; fix the YAML syntax") from None
    except yaml.YAMLError as error:
        raise StudyError(path, None, "yaml", f"{str(error).splitlines()[0]}; fix the YAML syntax") from None
    except RecursionError:
        raise StudyError(path, None, "yaml", "nested too deeply; flatten the lists and mappings") from None
    if not isinstance(document, dict):
        raise StudyError(path, 1, "study", "the file must be a mapping with at least 'name' and 'data'")
    return document, lines


# ------------------------------------------------------------------------------------------------
# --set KEY=VALUE


@dataclass(frozen=True)
class Override:
    """One ``--set KEY=VALUE``: the dotted key as a path into the document, and the value read as YAML."""

    text: str  # as given on the command line
    where: tuple[str, ...]
    value: Any
    flag: SetFlag  # where its values come from, in errors: "--set fixed.iterations=500"
    paths: tuple[tuple, ...]  # the path and every key and item inside the value


def parse_override(text: str, sections: tuple[str, ...]) -> Override:
    """``KEY=VALUE`` with KEY a dotted path starting at one of ``sections``, VALUE safe-loaded YAML (bounded
    and tag-checked as a study file's values are). A bad one is a ConfigError naming ``--set``."""
    key, equals, value_text = text.partition("=")
    key = key.strip()
    example = "e.g. --set fixed.iterations=500 or --set grid.width=[16,32]"
    if not equals:
        raise ConfigError("--set", text, f"write KEY=VALUE, {example}")
    if not key:
        raise ConfigError("--set", text, f"name the key before '=', {example}")
    where = tuple(key.split("."))
    if "" in where:
        raise ConfigError("--set", text, f"a key is names joined by single dots, {example}")
    if where[0] not in sections:
        raise ConfigError(
            "--set", text, f"a study has no '{where[0]}'; start the key with one of {', '.join(sections)}"
        )
    shown = visible(text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "...")
    found: dict = {}
    try:
        node = yaml.compose(value_text, Loader=yaml.SafeLoader)
        value = _Plain(Path("--set"), found).value(node, where) if node is not None else None
    except StudyError as error:  # a tag, a duplicate key, an alias bomb inside the value
        raise ConfigError("--set", text, error.fix) from None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(
            "--set",
            text,
            f"the value is not YAML ({problem}); write a list as [a, b], and quote text holding : [ ] {{ }}",
        ) from None
    except RecursionError:
        raise ConfigError("--set", text, "the value is nested too deeply; flatten it") from None
    flag = SetFlag(f"--set {shown}")
    return Override(text, where, value, flag, (where, *(path for path in found if path != where)))


def apply_overrides(path: Path, document: dict, lines: dict, overrides, exclusive: tuple[str, ...] = ()) -> None:
    """The overrides, in order, written into ``document`` (a later one wins), and their flags into ``lines``
    in place of the lines of what they replace. A parameter an override puts in one of the ``exclusive``
    sections leaves the others, where the file (not another override) set it: ``--set grid.lr=[0.1,0.3]``
    sweeps the lr the file fixed."""
    for override in overrides:
        parent = document
        for depth, part in enumerate(override.where[:-1], start=1):
            here = override.where[:depth]
            child = parent.get(part)
            if child is None:  # absent, or a key with nothing under it: a new mapping
                child = parent[part] = {}
                lines[here] = lines.get(here) or override.flag
            elif not isinstance(child, dict):
                name = ".".join(here)
                line = lines.get(here)
                at = f" ({line})" if isinstance(line, SetFlag) else f" ({path}:{line})" if line else ""
                raise ConfigError(
                    "--set",
                    override.text,
                    f"{name}{at} holds {_kind(child)}, not a mapping; set {name} whole (--set {name}=VALUE)",
                )
            parent = child
        _forget(lines, override.where)
        parent[override.where[-1]] = override.value
        lines.update(dict.fromkeys(override.paths, override.flag))
        _leave_other_sections(document, lines, override, exclusive)


def _leave_other_sections(document: dict, lines: dict, override: Override, exclusive: tuple[str, ...]) -> None:
    section = override.where[0]
    if section not in exclusive or len(override.where) > 2:
        return
    if len(override.where) == 2:
        names = [override.where[1]]
    else:
        names = list(override.value) if isinstance(override.value, dict) else []
    for other in exclusive:
        block = document.get(other)
        if other == section or not isinstance(block, dict):
            continue
        for name in names:
            if name in block and not isinstance(lines.get((other, name)), SetFlag):
                del block[name]
                _forget(lines, (other, name))


def _forget(lines: dict, where: tuple) -> None:
    for path in [path for path in lines if path[: len(where)] == where]:
        del lines[path]


def _kind(value) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "text"
    if isinstance(value, bool):
        return "true/false"
    return "a number" if isinstance(value, (int, float)) else type(value).__name__
