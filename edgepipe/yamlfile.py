"""Reading a config file: YAML in, a plain tree out, with ``${VAR}`` interpolated.

Nothing here knows what a pipeline is; :mod:`edgepipe.config` validates what this returns. Every
failure is a :class:`ConfigError` (one line per problem, naming the file or the path): a file
that cannot be read or is not UTF-8, invalid YAML (with line and column), a key written twice
(a second stage of the same name would silently replace the first), an alias cycle, or a
document that expands to more values through aliases than any config holds.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Set, Tuple

import yaml

__all__ = ["MAX_VALUES", "ConfigError", "interpolate", "join_path", "read_yaml"]

MAX_VALUES = 1_000_000
"""The most values a config may expand to through YAML aliases: a real one has a few hundred; a
few lines of nested aliases can stand for billions ("billion laughs")."""

# The last alternative catches a ``${`` that is neither ``$${`` nor a well-formed reference.
_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def join_path(path: str, key: object) -> str:
    """``path.key``; ``path[0]`` for a list index; ``path['odd\\nkey']`` (quoted) for a key that
    is empty, holds characters that do not print (a newline would split the error line in two)
    or ``": "`` (which would end the path early)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    text = str(key)
    if text and text.isprintable() and ": " not in text:
        return f"{path}.{text}" if path else text
    return f"{path}[{text!r}]"


class ConfigError(Exception):
    """A config that cannot run; ``errors`` holds one line per problem."""

    def __init__(self, errors: List[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def read_yaml(path: str) -> Any:
    """The parsed document of ``path`` (aliases resolved, nothing expanded or interpolated)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    try:
        # yaml.safe_load in two steps, to see the nodes: it keeps a repeated key's last value.
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: invalid YAML: {' '.join(str(problem).split())}"]) from None
    if data is None:
        raise ConfigError([f"{path}: the file is empty"])
    if _expanded_size(data, MAX_VALUES) > MAX_VALUES:
        raise ConfigError([
            f"{path}: expands to more than {MAX_VALUES} values through YAML aliases; "
            "a pipeline config is far smaller"
        ])
    duplicates = _duplicate_keys(node, "", set())
    if duplicates:
        raise ConfigError(duplicates)
    return data


def interpolate(
    value: Any, env: Mapping[str, str], path: str, errors: List[str]
) -> Tuple[Any, Dict[str, List[str]]]:
    """``${VAR}``/``${VAR:-default}`` in every string of a parsed YAML tree (keys untouched);
    ``$${`` is a literal ``${``. Returns the new tree and, per path, the variables its value
    came from (so an error about that setting can name the variable to change). Problems are
    appended to ``errors``.

    A YAML alias makes a node appear at several places: it is interpolated once (the copies
    stay shared). An alias that refers to a node holding it (a cycle) is a ConfigError naming
    the path where it closes the loop."""
    walker = _Interpolator(env, errors)
    return walker.walk(value, path), walker.used


class _Interpolator:
    def __init__(self, env: Mapping[str, str], errors: List[str]) -> None:
        self.env = env
        self.errors = errors
        self.used: Dict[str, List[str]] = {}  # path -> variables its value came from
        self.done: Dict[int, Any] = {}  # id of a container already walked -> its result
        self.active: Set[int] = set()  # containers on the path being walked (cycle check)

    def walk(self, value: Any, path: str) -> Any:
        if isinstance(value, (dict, list)):
            key = id(value)
            if key in self.active:
                raise ConfigError([f"{path or 'config'}: a YAML alias refers to a node that holds it (a cycle)"])
            if key in self.done:
                return self.done[key]
            self.active.add(key)
            try:
                if isinstance(value, dict):
                    out: Any = {k: self.walk(v, join_path(path, k)) for k, v in value.items()}
                else:
                    out = [self.walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
            finally:
                self.active.discard(key)
            self.done[key] = out
            return out
        if not isinstance(value, str) or "$" not in value:
            return value
        return _VAR.sub(lambda m: self.sub(m, value, path), value)

    def sub(self, m: re.Match, value: str, path: str) -> str:
        if m.group(0) == "$${":
            return "${"
        if m.group(0) == "${":
            self.errors.append(
                f"{path}: malformed variable reference in {value!r}: expected ${{NAME}} or "
                "${NAME:-default} (write $${ for a literal ${)"
            )
            return m.group(0)
        name, default = m.group(1), m.group(2)
        self.used.setdefault(path, []).append(name)
        if name in self.env:
            return self.env[name]
        if default is not None:
            return default
        self.errors.append(f"{path}: environment variable {name!r} is not set (in {value!r})")
        return m.group(0)


def _expanded_size(data: Any, limit: int) -> int:
    """How many values ``data`` holds with every alias expanded (a shared node counts each time
    it appears), without expanding anything; stops counting past ``limit``. Cycles count once
    here (the interpolation step names them)."""
    sizes: Dict[int, int] = {}

    def size(value: Any) -> int:
        if not isinstance(value, (dict, list)):
            return 1
        key = id(value)
        if key in sizes:
            return sizes[key]
        sizes[key] = 1  # on the path: a cycle back to it counts 1
        total = 1
        for item in (value.values() if isinstance(value, dict) else value):
            total += size(item)
            if total > limit:
                break
        sizes[key] = total
        return total

    return size(data)


def _duplicate_keys(node: Any, path: str, seen_nodes: Set[int]) -> List[str]:
    """One line per mapping key written twice (a second stage of the same name would silently
    replace the first)."""
    if id(node) in seen_nodes:  # an alias: checked where its anchor is
        return []
    seen_nodes.add(id(node))
    errors: List[str] = []
    if isinstance(node, yaml.MappingNode):
        lines: Dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
            where = join_path(path, name)
            line = key.start_mark.line + 1
            if name in lines:
                errors.append(f"{where}: duplicate key (lines {lines[name]} and {line})")
            lines.setdefault(name, line)
            errors += _duplicate_keys(value, where, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            errors += _duplicate_keys(item, f"{path}[{i}]", seen_nodes)
    return errors
