"""YAML with line numbers, and ``key=value`` overrides, for error messages that point at the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glmport.errors import ConfigError, Problem

_LOADER = None


def yaml_loader():
    """PyYAML's SafeLoader with YAML 1.2 scalars.

    The upstream demos read their configs with ruamel (YAML 1.2). PyYAML follows YAML 1.1, where
    ``learning_rate: 5e-5`` is the string "5e-5" and ``eval_strategy: no`` is the boolean False; in YAML
    1.2 they are the float 5e-05 and the string "no", which is what the configs mean.
    """
    global _LOADER
    if _LOADER is None:
        import re

        import yaml

        class Yaml12Loader(yaml.SafeLoader):
            pass

        bool_tag, float_tag = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
        Yaml12Loader.yaml_implicit_resolvers = {
            first: [(tag, rx) for tag, rx in resolvers if tag not in (bool_tag, float_tag)]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
        }
        Yaml12Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
        Yaml12Loader.add_implicit_resolver(
            float_tag,
            re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+|[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)$"
                       r"|^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
            list("-+0123456789."),
        )
        _LOADER = Yaml12Loader
    return _LOADER


def _lines_of(node, prefix: str, lines: dict[str, int]) -> None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[key] = key_node.start_mark.line + 1
            _lines_of(value_node, key, lines)


def load_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse ``path``; return the data and ``{dotted.key: line}``. Syntax errors name line and column."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml_loader())
        data = yaml.load(text, Loader=yaml_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError("the config file is not valid YAML", [Problem(where, f"YAML syntax error: {problem}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (data_config, training_args, ...)")
    lines: dict[str, int] = {}
    if node is not None:
        _lines_of(node, "", lines)
    return data, lines


def parse_override(text: str) -> tuple[list[str], Any]:
    """``training_args.max_steps=20`` -> (["training_args", "max_steps"], 20). Values are YAML scalars."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. training_args.max_steps=20")
    try:
        value = yaml.load(raw, Loader=yaml_loader()) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {exc}") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str], lines: dict[str, int]) -> dict[str, str]:
    """Apply ``key=value`` overrides in place. Returns ``{dotted.key: "override KEY=VALUE"}`` so errors
    about an overridden key point at the command line instead of the file."""
    origins: dict[str, str] = {}
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"override {text!r}: {where} is not a mapping, so it has no key {path[depth + 1]!r}")
            node = child
        node[path[-1]] = value
        dotted = ".".join(path)
        origins[dotted] = f"override `{text}`"
        lines.pop(dotted, None)
    return origins
