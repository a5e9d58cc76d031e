r"""Plain argparse with optional YAML defaults, and one validation pass over the parsed configuration.

`--config FILE.yaml` sets defaults, explicit flags win. Numeric flags declare their range with `bounded(...)`; after
parsing (`parse_with_config`), every value — from the command line or from the YAML file, where argparse does not
convert or check them — is type-checked and range-checked, and choices are enforced, before any data or model is
built. Errors name the flag and the allowed range.
"""
import argparse
import math
from pathlib import Path
from typing import Sequence

import yaml

from common.errors import FlagError, UserError, launcher_rank


def bounded(parser, flag: str, type: type, default, low: float | None = None, high: float | None = None,
            low_open: bool = False, help: str = '') -> argparse.Action:
    r"""Add a numeric flag with an allowed range [low, high] (`low_open`: low excluded). None default = unset.
    Returns the argparse action (e.g. to set its `metavar`)."""
    rng = _range_text(type, low, high, low_open)
    action = parser.add_argument(flag, type=type, default=default, help=f'{help} ({rng})'.strip())
    action.bounds = (low, high, low_open)
    return action


def _range_text(kind: type, low, high, low_open: bool) -> str:
    what = 'an integer' if kind is int else 'a number'
    if low is not None and high is not None:
        return f'{what} in {"(" if low_open else "["}{low:g}, {high:g}]'
    if low is not None:
        return f'{what} {">" if low_open else ">="} {low:g}'
    if high is not None:
        return f'{what} <= {high:g}'
    return what


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    r"""Check every value against its flag's type, range and choices (values from a YAML file included)."""
    for action in parser._actions:
        if action.dest in ('help', 'config') or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value is None:
            continue
        flag = action.option_strings[-1] if action.option_strings else action.dest
        for item in (value if isinstance(value, list) and action.nargs not in (None, '?') else [value]):
            _check_value(action, flag, item)
    return args


def _check_value(action: argparse.Action, flag: str, value) -> None:
    r"""One value of a flag (an element, for flags that take several) against its choices, type and range."""
    if action.choices is not None and value not in action.choices:
        raise UserError(f'{flag} {value!r}: choose one of {", ".join(map(str, action.choices))}')
    kind = action.type
    if kind in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and kind is int and (not isinstance(value, int)):
            ok = False
        if not ok:
            raise UserError(f'{flag} must be {"an integer" if kind is int else "a number"}, got {value!r}'
                            f' ({type(value).__name__})')
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f'{flag} must be a finite number, got {value!r}')
        bounds = getattr(action, 'bounds', None)
        if bounds is not None:
            low, high, low_open = bounds
            if (low is not None and (value < low or (low_open and value == low))) or \
                    (high is not None and value > high):
                raise UserError(f'{flag} must be {_range_text(kind, low, high, low_open)}, got {value!r}')
    elif kind is str and not isinstance(value, str):
        raise UserError(f'{flag} must be a string, got {value!r} ({type(value).__name__})')


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    r"""Parse `argv`, first applying the keys of `--config` (if given) as parser defaults, then `validate_args`.

    YAML keys use the flag names with `-` or `_` (`img-size` or `img_size`); an unknown key is an error that lists
    the valid ones, so a typo in a config file never passes silently.
    """
    if launcher_rank() != 0:           # under torchrun, rank 0 alone prints a usage error (every rank exits 2)
        parser.print_usage = lambda file=None: None
        parser._print_message = lambda message, file=None: None
    try:
        known = _preparse_config(argv)
        if known.config:
            parser.set_defaults(**load_yaml_defaults(known.config, parser))
        return validate_args(parser, parser.parse_args(argv))
    except FlagError:
        raise
    except UserError as err:           # about the command line: the same in every process
        raise FlagError(str(err)) from err


def _preparse_config(argv):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--config', type=str, default=None)
    return pre.parse_known_args(argv)[0]


def typed_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> set[str]:
    r"""The destinations the user actually gave, on the command line or in the `--config` file (not the parser's
    defaults), e.g. to tell `--bsz 20` from the default 20."""
    saved = {a.dest: a.default for a in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        given = set(vars(parser.parse_known_args(argv)[0]))
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]
    known = _preparse_config(argv)
    if known.config:
        given |= set(load_yaml_defaults(known.config, parser))
    return given - {'help', 'config'}


def load_yaml_file(path: str) -> dict:
    r"""A YAML config file as a mapping; a missing, unreadable or non-mapping file is a `UserError` naming it."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f'config file {file} does not exist')
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f'config file {file} is not valid YAML: {err}') from err
    if not isinstance(values, dict):
        raise UserError(f'config file {file} must hold a mapping of flag names to values')
    return values


def load_yaml_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    file = Path(path)
    values = load_yaml_file(path)
    valid = {a.dest for a in parser._actions if a.dest not in ('help', 'config')}
    out = {}
    for key, value in values.items():
        dest = str(key).replace('-', '_')
        if dest not in valid:
            raise UserError(f'config file {file}: unknown key {key!r}; valid keys: {", ".join(sorted(valid))}')
        out[dest] = value
    return out


def dump_config(config: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=True))
