r"""Validate a benchmark's folder layout and files; print counts per class and every problem found.

    python scripts/check_data.py --benchmark isic --datapath DATA
    python scripts/check_data.py --benchmark wbc --datapath DATA --wbc-subset 2 --json wbc-report.json

Runs the same scan as the loaders (data/checks.py) but decodes every file (`--quick`: headers only, as on dataset
construction) and checks mask values. Reports images without masks, masks without images, unreadable or truncated
files, size mismatches and unexpected mask values. Exit status: 0 no hard problem, 1 hard problems (the loader
would stop, or leave items out with --skip-bad), 2 the layout itself is missing or a flag is wrong.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import bounded, parse_with_config  # noqa: E402
from common.errors import UserError, run_cli  # noqa: E402
from data import DATASETS  # noqa: E402
from data.checks import CheckedDataset  # noqa: E402

OPTION_FLAGS = ('split_file', 'isic_classes', 'wbc_subset', 'chaos_cache', 'abd_ct_cache', 'cmr_cache')


def checkable() -> list[str]:
    return [name for name, cls in DATASETS.items() if issubclass(cls, CheckedDataset)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Check a benchmark folder before testing on it.')
    p.add_argument('--benchmark', required=True, help=f'one of: {", ".join(checkable())}')
    p.add_argument('--datapath', required=True, help='the folder passed to test.py --datapath')
    p.add_argument('--split', default=None, help='split to check (default: the benchmark\'s test split)')
    p.add_argument('--quick', action='store_true', help='headers and file tails only (what a loader checks)')
    bounded(p, '--limit', int, 20, low=1, help='problems listed per kind (default 20)')
    p.add_argument('--json', default=None, help='also write the report as JSON to this file')
    p.add_argument('--split-file', default=None, help='fss: folder with HSNet\'s {trn,val,test}.txt')
    p.add_argument('--isic-classes', default=None, help='isic: class CSV or folder names (as for test.py)')
    p.add_argument('--wbc-subset', default=None, help='wbc: 1, 2 or all')
    p.add_argument('--chaos-cache', default=None, help='chaos: prepared cache folder')
    p.add_argument('--abd-ct-cache', default=None, help='abd-ct: prepared cache folder')
    p.add_argument('--cmr-cache', default=None, help='cmr: prepared cache folder')
    return p


def main(argv=None) -> int:
    args = parse_with_config(build_parser(), argv)
    if args.benchmark not in checkable():
        raise UserError(f'check_data.py checks {", ".join(checkable())}; {args.benchmark!r} is not one of them')
    cls = DATASETS[args.benchmark]
    options = {k: getattr(args, k) for k in OPTION_FLAGS if getattr(args, k) is not None}
    foreign = sorted(set(options) - set(cls.options) - set(cls.switches))
    if foreign:
        raise UserError(f'{", ".join("--" + k.replace("_", "-") for k in foreign)} does not apply to benchmark '
                        f'{args.benchmark!r}')
    report = cls.check(args.datapath, split=args.split, full=not args.quick, **options)
    print(report.format(limit=args.limit))
    hard = report.hard
    if args.json:
        Path(args.json).write_text(json.dumps({
            'benchmark': args.benchmark, 'root': str(report.root), 'full': report.full,
            'files_checked': report.files_checked, 'counts': report.counts(), 'notes': report.notes,
            'warnings': report.warnings,
            'problems': [{'kind': p.kind, 'path': p.path, 'detail': p.detail, 'item': p.key, 'hard': p.hard}
                         for p in report.problems]}, indent=1))
    if hard:
        print(f'FAILED: {len(hard)} hard problems ({report.summary(hard=True)}); the loader stops on them unless '
              '--skip-bad leaves the affected items out')
        return 1
    print(f'OK: {sum(report.counts().values())} usable items in {len(report.counts())} classes')
    return 0


if __name__ == '__main__':
    run_cli(lambda: sys.exit(main()))
