"""Configuration from a YAML file and command-line flags (flags win), built by agent.core.config.

YAML numbers follow YAML 1.2, as a flag does: ``lr: 2e-4``, ``1E3``, ``.5`` and ``-1.5e+3`` are floats
(PyYAML alone follows YAML 1.1 there and reads them as strings); ``64`` stays an integer.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from agent.core.config import ConfigError, TrainConfig, build_config, check_keys, coerce_value


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: an exponent needs no dot, and the dot no digit
    before it. Integers resolve first (int's resolver comes earlier), so ``64`` stays an int."""


# YAML 1.2 core schema floats ([-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?), and
# .inf / .nan in their spellings (SafeLoader already resolves those; repeated so this list is whole).
_YAML12_FLOAT = re.compile(
    r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))


def read_yaml(path: Path) -> dict[str, Any]:
    """The keys of a configuration file, each known and of the right type (errors name key and file)."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
    try:
        values = yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys to values, got {type(values).__name__}"
        )
    bad_keys = [key for key in values if not isinstance(key, str)]
    if bad_keys:
        raise ConfigError(f"config file {path}: keys must be strings, got {bad_keys}")
    check_keys(values, source=f"config file {path}")
    for key, value in values.items():
        try:
            coerce_value(key, value)
        except ConfigError as error:
            raise ConfigError(f"config file {path}: {error}") from None
    return values


def parse_bool(text: str) -> bool:
    """``--flag true|false`` (any case); a bare ``--flag`` means true (see add_config_flags)."""
    lowered = text.lower()
    if lowered not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return lowered == "true"


_PARSERS = {"int": int, "float": float, "str": str, "bool": parse_bool}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig key (``--batch-size`` for ``batch_size``), defaulting to 'not given'."""
    group = parser.add_argument_group("training configuration (also settable in --config YAML)")
    for field in dataclasses.fields(TrainConfig):
        base = str(field.type).removesuffix(" | None")
        # Booleans take an optional value: ``--vectorize`` alone is true, ``--vectorize false`` undoes
        # a ``true`` from the YAML file.
        optional_value = {"nargs": "?", "const": True} if base == "bool" else {}
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=_PARSERS[base],
            default=argparse.SUPPRESS,
            metavar=base.upper(),
            help=field.metadata["help"],
            **optional_value,
        )
    parser.add_argument("--config", type=Path, help="YAML file of configuration keys; flags override it")


def config_from_args(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The validated config of a config file, overridden by flags, then by ``overrides``; a bad value
    that came from the file is reported with the file's name (ConfigError)."""
    path = getattr(args, "config", None)
    values: dict[str, Any] = read_yaml(path) if path else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {key: value for key, value in vars(args).items() if key in names}
    given.update(overrides or {})
    values.update(given)
    try:
        return build_config(values)
    except ConfigError as error:
        raise with_config_file(error, args, set(given)) from None


_WORD = re.compile(r"[a-z][a-z0-9_]*")


def with_config_file(
    error: ConfigError, args: argparse.Namespace, flags: set[str] | None = None
) -> ConfigError:
    """``error`` naming ``args.config`` when keys it mentions were set there: prefixed with the file when
    no flag set any key it mentions, else with the file's keys appended. ``flags``: the keys given on the
    command line (default: those in ``args``)."""
    path = getattr(args, "config", None)
    if not path or str(error).startswith("config file "):
        return error
    try:
        file_keys = set(read_yaml(path))
    except ConfigError:
        return error
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if flags is None:
        flags = {key for key in vars(args) if key in names}
    mentioned = {word for word in _WORD.findall(str(error)) if word in names}
    from_file = mentioned & (file_keys - flags)
    if not from_file:
        return error
    if mentioned & flags:
        return ConfigError(f"{error} (config file {path} sets {', '.join(sorted(from_file))})")
    return ConfigError(f"config file {path}: {error}")
