"""What every config section shares: one error type, one section base, YAML in, overrides.

``ConfigError`` is the model's own (``mvtcae.model.ConfigError``): a bad value raises the same
exception whether it is caught by the model or by the platform's configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mvtcae.config.locations import CredentialsInLocationError
from mvtcae.model.model_config import ConfigError
from mvtcae.safety.redaction import redact

__all__ = [
    "ConfigError",
    "Section",
    "apply_overrides",
    "format_errors",
    "read_yaml_mapping",
]


class Section(BaseModel):
    """A config section: unknown keys are refused and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.field=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(text))
    return raw


def format_errors(err: ValidationError, source: str, prefix: str = "") -> str:
    """One line per invalid field, naming it (prefixed with ``prefix``) and, unless it could be a
    secret, the value it got (with credentials masked)."""
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        where = prefix + ".".join(str(p) for p in e["loc"]) or "<root>"
        secret = isinstance(e.get("ctx", {}).get("error"), CredentialsInLocationError)
        shown = e["type"] != "missing" and "input" in e and not secret
        got = f" (got {redact(e['input'])!r})" if shown else ""
        lines.append(f"  {where}: {e['msg']}{got}")
    return "\n".join(lines)


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: {}); errors name ``what`` and path."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path}: top level must be a mapping")
    return loaded or {}
