"""YAML <-> Config: strict loading, dotted overrides, dumping.

Every problem is collected and raised at once as a ConfigError naming each key path: unknown keys (with a
"did you mean"), wrong types, out-of-range values (from the schema's `validate`), duplicate keys. PyYAML's
YAML 1.1 resolver reads `1e-4` as a string; our loader reads it as a float (YAML 1.2), and a float field
given a string is an error, so the trap cannot pass silently.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml

from configs.schema import MOVED_KEYS, Config


class ConfigError(ValueError):
    """All problems of one config, one per line, each starting with its dotted key path."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in {source}:\n  " + "\n  ".join(problems))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 / 1E+3 as floats (duplicate keys are caught by `parse_yaml`)."""


_FLOAT_RE = re.compile(r"""^[-+]?(
    \d[\d_]*\.[\d_]*([eE][-+]?\d+)?      # 1.5, 1., 1.5e-3
  | \.\d[\d_]*([eE][-+]?\d+)?           # .5 (a digit is required: a bare "." is a string, not float("."))
  | \d[\d_]*[eE][-+]?\d+                 # 1e-4 (YAML 1.1 reads this as a string)
  | \.(inf|Inf|INF) | \.(nan|NaN|NAN)
)$""", re.X)
_StrictLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


class _StrictDumper(yaml.SafeDumper):
    """SafeDumper with the loader's resolvers, so a string such as "1e5" is quoted (else it loads back as a float)."""


_StrictDumper.yaml_implicit_resolvers = {k: list(v) for k, v in _StrictLoader.yaml_implicit_resolvers.items()}


def _duplicate_keys(node: yaml.Node | None, path: str, problems: list[str]) -> None:
    """Every key repeated in a mapping of the YAML node tree, named by its dotted key path (all at once)."""
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            kp = f"{path}.{key}" if path else str(key)
            if key is not None and key in first_line:
                problems.append(f"{kp}: duplicate key (lines {first_line[key] + 1} and {key_node.start_mark.line + 1})")
            elif key is not None:
                first_line[key] = key_node.start_mark.line
            _duplicate_keys(value_node, kp, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(item, f"{path}[{i}]", problems)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """YAML text -> plain data; duplicate keys are errors (PyYAML silently keeps the last), named by key path."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        problems: list[str] = []
        _duplicate_keys(node, "", problems)
        if problems:
            raise ConfigError(problems, source)
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise ConfigError([f"(yaml) {e}".replace("\n", " ")], source) from None
    finally:
        loader.dispose()


# ---------------------------------------------------------------- dict -> dataclass, with type checks

def _check_value(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping (section), got {type(value).__name__} {value!r}")
            return tp()
        return _build(tp, value, path, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list of {item_tp.__name__}, got {type(value).__name__} {value!r}")
            return []
        return [_check_value(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is typing.Literal:  # a choice, checked here at its field
        choices = typing.get_args(tp)
        if isinstance(value, bool) or value not in choices:
            hint = (" (YAML reads no/yes/on/off as booleans: quote it, e.g. train.mixed_precision='no')"
                    if isinstance(value, bool) else "")
            problems.append(f"{path}: {value!r} is not one of {list(choices)}{hint}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = " (quoted number? write it unquoted, e.g. 1.0e-4)" if isinstance(value, str) else ""
            problems.append(f"{path}: expected float, got {type(value).__name__} {value!r}{hint}")
            return value
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected bool (true/false), got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            # YAML 1.1 reads no/yes/on/off as booleans: `--set train.mixed_precision=no` arrives as False
            hint = (" (YAML reads no/yes/on/off as booleans: quote it, e.g. train.mixed_precision='no')"
                    if isinstance(value, bool) else "")
            problems.append(f"{path}: expected str, got {type(value).__name__} {value!r}{hint}")
        return value
    raise TypeError(f"schema type {tp} at {path} is not supported by the loader")


def _build(cls: type, raw: dict, path: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        kp = f"{path}.{key}" if path else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            if kp in MOVED_KEYS:
                hint = f"; it moved to {MOVED_KEYS[kp]}"
            problems.append(f"{kp}: unknown key{hint}")
            continue
        kwargs[key] = _check_value(value, hints[key], kp, problems)
    try:
        return cls(**kwargs)
    except TypeError:  # a nested value had the wrong type; problems already lists it
        return cls()


PROJECT_ROOT = Path(__file__).resolve().parents[1]
PATH_FIELDS = (("data", "root"), ("vae", "pretrained"))  # local paths a run folder's config must find from anywhere


def resolve_paths(cfg: Config, project_root: Path = PROJECT_ROOT) -> Config:
    """Relative data.root / vae.pretrained that do not exist from the working directory but do under the project
    root (where the demo and the configs/ YAMLs are run from, and so where a stored run config's relative paths
    point) become absolute there; any other value is left as it is. So a run folder loads from any directory, and a
    relative VAE folder is never tried as a hub id (`assets/vae_synthetic` also reads as owner/name)."""
    for section, key in PATH_FIELDS:
        part = getattr(cfg, section)
        value = getattr(part, key)
        if not value or Path(value).expanduser().is_absolute() or Path(value).exists():
            continue
        candidate = project_root / value
        if candidate.exists():
            setattr(part, key, str(candidate))
    return cfg


def config_from_dict(raw: dict | None, source: str = "config") -> Config:
    """Build and validate a Config from plain data; raises ConfigError listing every problem. Relative paths are
    resolved as `resolve_paths` says."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"(top level): expected a mapping of sections, got {type(raw).__name__}"], source)
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
    try:  # range checks; a field of the wrong type (already reported) may trip them
        problems.extend(cfg.validate())
    except TypeError:
        pass
    if problems:
        raise ConfigError(problems, source)
    return resolve_paths(cfg)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path | None = None) -> str:
    """The resolved config as YAML; loading it back gives an equal Config."""
    text = yaml.dump(config_to_dict(cfg), Dumper=_StrictDumper, sort_keys=False, default_flow_style=None)
    if path is not None:
        Path(path).write_text(text)
    return text


# ---------------------------------------------------------------- overrides and the one entry point

_YAML_INDICATORS = set("*&!|>%@`")  # characters that cannot start a plain (unquoted) YAML string


def apply_overrides(raw: dict, overrides: Iterable[str], problems: list[str]) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a raw dict; bad ones are added to `problems`."""
    for item in overrides:
        item = item[len("--set="):] if item.startswith("--set=") else item
        if "=" not in item:
            problems.append(f"{item}: override must look like section.key=value")
            continue
        dotted, text = item.split("=", 1)
        try:
            value = parse_yaml(text, f"override {dotted}") if text.strip() else ""
        except ConfigError as e:
            if text.lstrip()[:1] in _YAML_INDICATORS:  # *.jpg reads as a YAML alias, &x as an anchor, ...
                problems.append(f"{dotted}: {text!r} is not a YAML value (a leading '{text.lstrip()[0]}' has a meaning "
                                f"in YAML); quote it, e.g. --set \"{dotted}='{text}'\" (the outer quotes are for "
                                "the shell)")
            else:
                problems.extend(f"{dotted}: {p}" for p in e.problems)
            continue
        node = raw
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"{dotted}: {part} is not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML file (or the defaults when path is None), apply dotted overrides, validate.

    Raises ConfigError with every problem, each naming its key path; FileNotFoundError for a missing file.
    """
    source = str(path) if path else "defaults"
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        raw = parse_yaml(p.read_text(), source) or {}
        if not isinstance(raw, dict):
            raise ConfigError([f"(top level): expected a mapping of sections, got {type(raw).__name__}"], source)
    problems: list[str] = []
    apply_overrides(raw, overrides, problems)
    if problems:
        raise ConfigError(problems, source)
    return config_from_dict(raw, source)
