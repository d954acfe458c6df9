"""Reading a config file's YAML: one-line errors with line and column, duplicate keys refused, and typed
scalars that remember how they were written (so a text key keeps `010` as written, not as octal 8)."""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


class Scalar(typing.NamedTuple):
    """A YAML scalar that YAML 1.1 typed as something other than a string (int, float, bool, date), with
    the text it was written as: a string key takes that text, so `task: 010` stays '010', not 8."""
    value: Any
    text: str

    def __str__(self) -> str:
        return self.text


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a second `pretrain:` would silently drop the first) and
    keeps the source text of typed scalars (Scalar)."""

    def construct_mapping(self, node, deep=False):
        first_line: dict[str, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key_node.value}' (first on line {first_line[key_node.value]})",
                    key_node.start_mark)
            first_line[key_node.value] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


for _tag in ("int", "float", "bool", "timestamp"):
    ConfigLoader.add_constructor(
        f"tag:yaml.org,2002:{_tag}",
        lambda loader, node, base=yaml.SafeLoader.yaml_constructors[f"tag:yaml.org,2002:{_tag}"]:
            Scalar(base(loader, node), node.value))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(e: yaml.YAMLError) -> str:
    """`LINE:COL: problem` of a YAML error, on one line."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return at + " ".join(str(problem).split())


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (see configs/ for examples)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; give a YAML file, e.g. configs/demo.yaml") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          "save it as UTF-8") from None
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(e)}") from None
    raw = plain(raw)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (run:, data:, ...)")
    return raw


def plain(value: Any) -> Any:
    return value.value if isinstance(value, Scalar) else value
