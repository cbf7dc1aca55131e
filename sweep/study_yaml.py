"""Study files as YAML with line numbers: safe-loaded, bounded, every mapping key's line recorded.

What the reader refuses is a :class:`StudyError` naming the file, the line and the field.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from gradinv.errors import ConfigError

MAX_FILE_BYTES = 1 << 20  # a study file is a few kB; even 50,000 listed image indices fit
MAX_ALIAS_VALUES = 10_000  # values that aliases may add by repeating what they refer to


class StudyError(ConfigError):
    """A mistake in a study file, located by file and line."""

    def __init__(self, path: Path | str, line: int | None, field_name: str, message: str):
        where = f"{path}:{line}" if line else str(path)
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
