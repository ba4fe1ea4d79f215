"""``--config FILE`` for every ``cxr-train`` command: a YAML (``.yaml``/``.yml``, needs PyYAML) or
JSON file whose keys are the command's option names (dest names, ``-`` or ``_``). Its values become
the parser's defaults, so flags on the command line override them; each value is checked with the
option's own ``type=`` and ``choices``, and a required option the file gives is no longer required.
The resolved config (every option's final value, JSON-able) is written into the run folder and the
bundle's manifest (``provenance.config``), so ``cxr-train COMMAND --config that.yaml`` repeats a run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: options that are not part of a command's config
_NOT_CONFIG = {"help", "config"}

#: help of ``--config``
CONFIG_HELP = ("YAML (.yaml/.yml) or JSON file of this command's options (keys: the option names without "
               "'--', with '-' or '_'); flags given here override it. Every training run writes the resolved "
               "config to OUT.run/config.yaml (and the bundle's provenance.config): "
               "'cxr-train COMMAND --config OUT.run/config.yaml' repeats the run")


class ConfigError(Exception):
    """A config file that cannot be used (one line, exit status 2)."""


def add_config_argument(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` (read before parsing by :func:`apply_config`; recorded as given)."""
    p.add_argument("--config", default=None, metavar="FILE", help=CONFIG_HELP)


def config_path(argv: Sequence[str], commands: Sequence[str]) -> tuple[str | None, str | None]:
    """(command, ``--config`` value) of a ``cxr-train`` command line (None where absent)."""
    argv = list(argv)
    idx = next((i for i, a in enumerate(argv) if a in commands), None)
    if idx is None:
        return None, None
    pre = argparse.ArgumentParser(add_help=False)  # abbreviations as the command's parser takes them
    pre.add_argument("--config", default=None)
    ns, _ = pre.parse_known_args(argv[idx + 1:])
    return argv[idx], ns.config


def read_config(path: str | os.PathLike) -> dict:
    """The mapping in a ``.yaml``/``.yml``/``.json`` file; :class:`ConfigError` otherwise."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read it: {err.strerror or err}") from err
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise ConfigError("YAML configs need PyYAML (pip install pyyaml); or give a .json file") from err
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError("not valid YAML: " + " ".join(str(err).split())) from err
    elif p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"not valid JSON: {err}") from err
    else:
        raise ConfigError("give a .yaml, .yml or .json file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("must be a mapping of option names to values")
    return data


def _config_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action of the options a config may set."""
    return {a.dest: a for a in parser._actions
            if a.option_strings and a.dest not in _NOT_CONFIG and a.dest != argparse.SUPPRESS}


def _convert(action: argparse.Action, key: str, value: Any) -> Any:
    """``value`` as the parser would give it for ``action`` (its type and choices)."""
    if action.nargs == 0:  # store_true / store_false / store_const
        if not isinstance(value, bool) and value is not None:
            raise ConfigError(f"{key}: expects true or false, not {value!r}")
        return value
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and (action.nargs not in (None, "?") or
                                            isinstance(action, argparse._AppendAction)):
        return [_convert_one(action, key, v) for v in value]
    return _convert_one(action, key, value)


def _convert_one(action: argparse.Action, key: str, value: Any) -> Any:
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    try:
        out = action.type(text) if action.type is not None else text
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        kind = getattr(action.type, "__name__", "value")
        raise ConfigError(f"{key}: invalid {kind} value {value!r}" + (f" ({err})" if str(err) else "")) from err
    if action.choices is not None and out not in action.choices:
        raise ConfigError(f"{key}: invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})")
    return out


def apply_config(parser: argparse.ArgumentParser, path: str | os.PathLike) -> dict:
    """Read ``path`` and make its values ``parser``'s defaults (validated); the converted values."""
    data = read_config(path)
    actions = _config_actions(parser)
    unknown = sorted(k for k in data if str(k).replace("-", "_") not in actions)
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))} "
                          f"(valid: {', '.join(sorted(actions))})")
    values: dict[str, Any] = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        action = actions[dest]
        values[dest] = _convert(action, str(key), value)
        if values[dest] is not None:
            action.required = False
    parser.set_defaults(**values)
    return values


def apply_config_or_exit(parser: argparse.ArgumentParser, command: str, path: str) -> None:
    """:func:`apply_config`, or one line on stderr and exit status 2."""
    try:
        apply_config(parser, path)
    except ConfigError as err:
        sys.stderr.write(f"cxr-train {command}: error: --config {path}: {err}\n")
        raise SystemExit(2) from None


def jsonable(value: Any) -> Any:
    """``value`` with paths as strings and tuples as lists (what a config file can hold)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def resolved_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """Every option of ``parser``'s command with its final value in ``args`` (JSON-able)."""
    return {dest: jsonable(getattr(args, dest, None)) for dest in _config_actions(parser)}


def config_file_name() -> str:
    """``config.yaml`` where PyYAML is installed, else ``config.json``."""
    import importlib.util

    return "config.yaml" if importlib.util.find_spec("yaml") is not None else "config.json"


def write_config(folder: str | os.PathLike, config: dict) -> Path:
    """Write ``config`` as :func:`config_file_name` in ``folder`` (atomically); its path."""
    from cxrviewer.core.atomic import mkstemp_beside

    path = Path(folder) / config_file_name()
    if path.suffix == ".yaml":
        import yaml

        text = "# cxr-train resolved config: repeat the run with 'cxr-train COMMAND --config THIS'\n"
        text += yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    else:
        text = json.dumps(config, indent=1) + "\n"
    fd, tmp = mkstemp_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
