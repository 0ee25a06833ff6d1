"""Load the config tree from YAML, apply dotted command-line overrides, validate.

Every failure is a ConfigError whose message is one line naming the culprit (file, key or
override) and what was expected; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from moe_vae.config.schema import Config
from moe_vae.errors import MoeVaeError


class ConfigError(MoeVaeError):
    """A bad config file, key, value or override."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 needs `1.0e-3`, a common trap)
    and refuses a mapping that repeats a key (PyYAML keeps the last value without a word, so a
    second `lr:` further down a section silently wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` keys may be overridden: that is what merging is for
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # an unhashable key: the base class says so
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_value(text: str) -> Any:
    """Parse one override value the way YAML would (`3` -> int, `[128, 64]` -> list, `null`)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text  # not valid YAML on its own: keep the string, validation decides


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """`["--train.epochs=3", "--model.z_dim", "4"]` -> `[("train.epochs", 3), ("model.z_dim", 4)]`
    (values parsed as YAML)."""
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(
                f"unexpected argument {arg!r}: overrides look like --section.key=value"
            )
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override --{key} has no value: use --{key}=VALUE")
            value = args[i + 1]
            i += 1
        if "." not in key:
            raise ConfigError(
                f"unknown option --{key}: config overrides are dotted, e.g. --train.epochs=3"
            )
        out.append((key, parse_value(value)))
        i += 1
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found (expected a YAML file)")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {str(path)!r}: {problem}{where}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}"
        )
    return data


def _apply(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parts[: depth + 1])
            raise ConfigError(f"override --{key}: {prefix!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section that holds `loc`'s last key, for 'unknown key' messages."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            known = _known_keys(e["loc"])
            hint = f" (expected one of: {', '.join(known)})" if known else ""
            parts.append(f"unknown key {loc!r}{hint}")
        elif e["type"] == "value_error":  # a cross-field rule: its message names the keys
            parts.append(e["msg"].removeprefix("Value error, "))
        else:
            parts.append(f"{loc}: {e['msg']}, got {e['input']!r}")
    return "invalid config: " + "; ".join(parts)


def build_config(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Defaults (the founding recipe) <- YAML file (or `base`, a config as a dict) <- dotted
    overrides, then validate."""
    data = read_yaml(path) if path is not None else dict(base or {})
    for key, value in parse_overrides(overrides or []):
        _apply(data, key, value)
    return build_config(data)


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
