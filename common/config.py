r"""Plain argparse with optional YAML defaults: `--config FILE.yaml` sets defaults, explicit flags win."""
import argparse
from pathlib import Path
from typing import Sequence

import yaml

from common.errors import UserError


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    r"""Parse `argv`, first applying the keys of `--config` (if given) as parser defaults.

    YAML keys use the flag names with `-` or `_` (`img-size` or `img_size`); an unknown key is an error that lists
    the valid ones, so a typo in a config file never passes silently.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--config', type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_yaml_defaults(known.config, parser))
    return parser.parse_args(argv)


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
