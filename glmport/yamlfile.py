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
        data = path.read_bytes()
    except FileNotFoundError:
        raise _unreadable(str(path), "config file not found",
                          "check the path (it is relative to the working directory)") from None
    except IsADirectoryError:
        raise _unreadable(str(path), "is a folder; the config is a YAML file",
                          "name the file, e.g. configs/lora.yaml") from None
    except OSError as exc:
        raise _unreadable(str(path), f"cannot read the config file: {exc.strerror or exc}") from None
    text = decode_utf8(path, data)
    try:
        node = yaml.compose(text, Loader=yaml_loader())
        data = yaml.load(text, Loader=yaml_loader())  # a SafeLoader: tags that build Python objects are errors
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        if isinstance(exc, yaml.constructor.ConstructorError):
            raise ConfigError("the config file is not plain YAML", [Problem(
                where, f"YAML tag not allowed: {problem}",
                "write a plain value: configs are read with a safe loader that builds no Python objects")]) from None
        raise ConfigError("the config file is not valid YAML", [Problem(where, f"YAML syntax error: {problem}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _unreadable(f"{path}:1", f"the top level is a {type(data).__name__}, not a mapping of keys",
                          "start the file with the sections: data_config:, training_args:, ...")
    lines: dict[str, int] = {}
    if node is not None:
        _lines_of(node, "", lines)
    return data, lines


def _unreadable(where: str, what: str, fix: str = "") -> ConfigError:
    return ConfigError("the config file cannot be used", [Problem(where, what, fix)])


def decode_utf8(path: Path, data: bytes) -> str:
    """The text of a UTF-8 file (a byte-order mark is allowed), or a :class:`ConfigError` naming the line,
    column and byte offset of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError("the config file is not UTF-8 text", [Problem(
            f"{path}:{line}:{column}", f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            "save the file as UTF-8: your editor's 'save with encoding', or "
            f"`iconv -f GBK -t UTF-8 {path.name} > utf8-{path.name}` for a file saved as GBK")]) from None


def _bad_override(text: str, what: str, fix: str = "") -> ConfigError:
    where = f"override `{text}`"
    return ConfigError(f"{where}: {what}", [Problem(where, what, fix)])


def parse_override(text: str) -> tuple[list[str], Any]:
    """``training_args.max_steps=20`` -> (["training_args", "max_steps"], 20). Values are YAML scalars."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise _bad_override(text, "expected KEY=VALUE with a dotted key, e.g. training_args.max_steps=20")
    try:
        value = yaml.load(raw, Loader=yaml_loader()) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise _bad_override(text, f"the value is not valid YAML: {getattr(exc, 'problem', None) or exc}",
                            "to pass it as a string, quote it for YAML inside the shell's quotes: \"KEY='VALUE'\"") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str], lines: dict[str, int],
                    problems: list[Problem] | None = None) -> dict[str, str]:
    """Apply ``key=value`` overrides in place. Returns ``{dotted.key: "override `KEY=VALUE`"}`` so errors
    about an overridden key point at the command line instead of the file.

    A bad override raises a :class:`ConfigError`; when ``problems`` is given, it is added there instead and
    skipped, so that one error lists it with the config's own problems."""
    origins: dict[str, str] = {}
    for text in overrides:
        try:
            path, value = parse_override(text)
            node = data
            for depth, part in enumerate(path[:-1]):
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                if not isinstance(child, dict):
                    where = ".".join(path[: depth + 1])
                    raise _bad_override(text, f"{where} is not a mapping, so it has no key {path[depth + 1]!r}",
                                        f"override {where} itself ({where}=VALUE), or check the key's spelling")
                node = child
        except ConfigError as exc:
            if problems is None:
                raise
            problems.extend(exc.problems)
            continue
        node[path[-1]] = value
        dotted = ".".join(path)
        origins[dotted] = f"override `{text}`"
        lines.pop(dotted, None)
    return origins
