r"""Command-line flags of the method options and the plug-ins, without torch: train.py, test.py and predict.py build
their parsers from this, so `-h` and argument errors answer before anything heavy is imported (engine/factory.py
builds the models).

A plug-in is registered in `PLUGINS` by the import path of its torch-free spec (the protocol described in
engine/factory.py): its settings, their flags, and how it is built.
"""
import argparse

from common.config import bounded
from common.constants import MIN_IMG_SIZE
from common.names import PRECISIONS
from model import option_specs

PLUGINS: dict[str, str] = {
    'cdtg': 'text.settings:CDTGPlugin',
}


def plugin_specs() -> list:
    r"""The registered plug-ins' specs (torch-free: settings, flags, building)."""
    import importlib
    specs = []
    for target in PLUGINS.values():
        module, name = target.split(':')
        specs.append(getattr(importlib.import_module(module), name))
    return specs


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--config', type=str, default=None,
                        help='YAML file whose keys set the defaults of these flags')


def add_runtime_args(parser: argparse.ArgumentParser, *, img_size_help: str, bsz_default: int | None, bsz_help: str,
                     seed_help: str, workers: bool = True, precision_help: str | None = None) -> None:
    r"""The runtime flags train.py, test.py and predict.py share: --img-size, --bsz, --workers (loader processes),
    --seed, --device and, for the commands that run the loops, --precision and --compile. Each command says what
    its image size, batch and seed mean."""
    bounded(parser, '--img-size', int, None, low=MIN_IMG_SIZE, high=4096, help=img_size_help)
    bounded(parser, '--bsz', int, bsz_default, low=1, help=bsz_help)
    if workers:
        bounded(parser, '--workers', int, 4, low=0, help='data loader processes (0: load in the main process)')
    bounded(parser, '--seed', int, 0, low=0, high=2**63 - 1, help=seed_help)
    parser.add_argument('--device', type=str, default='auto', help='auto | cpu | cuda | cuda:N')
    if precision_help:
        parser.add_argument('--precision', type=str, default='fp32', choices=tuple(PRECISIONS), help=precision_help)
        parser.add_argument('--compile', action='store_true', help='torch.compile the matching stage (opt-in; CUDA)')


def add_adaptation_args(parser: argparse.ArgumentParser, unit: str) -> None:
    r"""Test-time adaptation (test.py, predict.py): steps per `unit` ('episode', 'query') and learning rate; None
    = the method's own setting."""
    bounded(parser, '--finetune-steps', int, None, low=0,
            help=f"test-time adaptation steps per {unit}, for methods that have it (default: the method's; reset "
                 f'after every {unit})')
    bounded(parser, '--finetune-lr', float, None, low=0, low_open=True,
            help="learning rate of test-time adaptation (default: the method's)")


def add_plugin_args(parser: argparse.ArgumentParser, stage: str) -> None:
    r"""Every plug-in's flags for `stage` ('train': all of them, saved in the checkpoint; 'test': the overrides)."""
    for spec in plugin_specs():
        spec.add_args(parser, stage)


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
