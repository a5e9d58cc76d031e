r"""Command-line flags of the method options and the plug-ins, without torch: train.py, test.py and predict.py build
their parsers from this, so `-h` and argument errors answer before anything heavy is imported (engine/factory.py
builds the models).

A plug-in is registered in `PLUGINS` by two import paths: its class (a `model.base.Hooks` subclass with the protocol
described in engine/factory.py) and a torch-free `add_args(parser, stage)` that declares its flags.
"""
import argparse

from common.config import bounded
from model import option_specs

PLUGINS: dict[str, dict[str, str]] = {
    'cdtg': {'class': 'text.plugin:CDTG', 'flags': 'text.flags:add_args'},
}


def add_plugin_args(parser: argparse.ArgumentParser, stage: str) -> None:
    r"""Every plug-in's flags for `stage` ('train': all of them, saved in the checkpoint; 'test': the overrides)."""
    import importlib
    for target in PLUGINS.values():
        module, name = target['flags'].split(':')
        getattr(importlib.import_module(module), name)(parser, stage)


def preparse_method(argv, default: str = 'hsnet') -> str:
    r"""The --method of a command line (or of its --config YAML), before the full parser exists: the method decides
    which option flags the parser has."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--method', type=str, default=None)
    pre.add_argument('--config', type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.method:
        return known.method
    if known.config:
        from common.config import load_yaml_file
        return load_yaml_file(known.config).get('method', default)
    return default


def add_method_args(parser: argparse.ArgumentParser, method: str) -> list[str]:
    r"""One flag per option of the method (default None = the method's default, so a resumed run knows which were
    typed), with its choices or its range. Returns the option names."""
    specs = option_specs(method)
    if not specs:
        return []
    group = parser.add_argument_group(f'{method} options')
    for spec in specs:
        flag = '--' + spec.name.replace('_', '-')
        text = f'{spec.help} (default: {spec.default})'
        if isinstance(spec.default, bool):
            group.add_argument(flag, default=None, action=argparse.BooleanOptionalAction, help=text)
        elif isinstance(spec.default, (int, float)) and (spec.low is not None or spec.high is not None):
            bounded(group, flag, type(spec.default), None, low=spec.low, high=spec.high, help=text)
        else:
            group.add_argument(flag, default=None, type=type(spec.default), choices=spec.choices or None, help=text)
    return [spec.name for spec in specs]
