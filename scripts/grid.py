r"""Method x (±CD-TG) x target x shots grid: train each model once on a source benchmark, test it everywhere.

    python scripts/grid.py --methods hsnet patnet --cdtg off on --benchmark pascal --targets isic lung wbc chaos \
        --shots 1 5 --datapath DATA --logroot logs/grid -- --backbone-weights imagenet --epochs 50
    python scripts/grid.py ... --alphas 0.5 0.6 0.7 0.8 0.9      # alpha sweep of fixed-fusion CD-TG models
    python scripts/grid.py ... --targets chaos:volumetric         # one test.py --protocol of a target
    python scripts/grid.py ... --gpus 4 --dry-run                 # print the torchrun commands, run nothing

Everything after `--` is passed to train.py unchanged (the same for every run, so baseline and +CD-TG share schedule,
checkpoint rule and seed; test episodes are the same list for every model). Existing checkpoints are reused, and so is
a cell whose results.json was written by the same test.py command after the checkpoint, so an interrupted grid can be
restarted and only the missing cells run. Writes grid.csv and grid.md (mIoU / FB-IoU / Dice per cell) under
--logroot; each cell's results.json (with its episode list) stays in the model's run folder (scripts/report.py turns
them into tables and figures).

A target runs in every protocol its benchmark has unless one is named: `chaos` gives two rows, 2D episodes (mIoU)
and the volumetric protocol (Q-Net's: 3D Dice per organ, the metric the medical few-shot literature reports);
`chaos:volumetric` only the latter. An alpha sweep evaluates on the target's test episodes: it is an analysis, not a
way to choose alpha (the reported setting stays alpha = 0.7); it applies to prototype hosts only (on HSNet, alpha
has no image-weight meaning and test.py refuses it).

With --gpus 1 (default) train.py and test.py run in this process; --gpus N > 1 runs each of them as
`torchrun --standalone --nproc_per_node N`. --dry-run prints the train/test commands the grid still needs, as shell
commands, and runs nothing.
"""
import argparse
import csv
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.errors import UserError, run_cli  # noqa: E402
from data import DATASETS, dataset_class  # noqa: E402
from model import METHODS  # noqa: E402


def __getattr__(name: str):
    r"""`grid.train_cli` / `grid.test_cli`: train.py and test.py, imported on first use (a dry run imports neither
    torch nor the data code)."""
    if name in ('train_cli', 'test_cli'):
        import importlib
        return importlib.import_module(name[:-4])
    raise AttributeError(name)


def finished_cell(folder: Path, checkpoint: Path, cmd: list[str]) -> dict | None:
    r"""The results of a cell already run with exactly `cmd` on the current checkpoint, else None."""
    results, record = folder / 'results.json', folder / 'grid-cell.json'
    if not (results.exists() and record.exists()):
        return None
    if json.loads(record.read_text()) != cmd or results.stat().st_mtime < checkpoint.stat().st_mtime:
        return None
    return json.loads(results.read_text())


def command(script: str, args: list[str], gpus: int) -> list[str]:
    r"""The command line that runs `script` (train.py / test.py) with `args` on `gpus` GPUs."""
    path = str(ROOT / script)
    if gpus > 1:
        launcher = ['torchrun'] if shutil.which('torchrun') else [sys.executable, '-m', 'torch.distributed.run']
        return launcher + ['--standalone', '--nproc_per_node', str(gpus), path] + args
    return [sys.executable, path] + args


def launch(script: str, args: list[str], gpus: int):
    r"""Run train.py / test.py: in this process (one GPU or CPU; returns its result), or under torchrun."""
    if gpus <= 1:
        return __getattr__('train_cli' if script == 'train.py' else 'test_cli').main(args)
    cmd = command(script, args, gpus)
    print('+ ' + shlex.join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise UserError(f'{script} failed under torchrun: {shlex.join(cmd)}')
    return None


def target_protocols(spec: str) -> tuple[str, list[str]]:
    r"""'chaos:volumetric' -> ('chaos', ['volumetric']); 'chaos' -> ('chaos', ['2d', 'volumetric']) (every protocol
    of the benchmark); 'isic' -> ('isic', ['2d'])."""
    name, _, protocol = spec.partition(':')
    if name not in DATASETS:
        dataset_class(name)                                  # raises the error that names the benchmarks
    known = DATASETS.declared(name, 'protocols', ('2d',))
    if protocol and protocol not in known:
        raise UserError(f'--targets {spec}: {name} has the protocols {", ".join(known)}, not {protocol!r}')
    return name, [protocol] if protocol else list(known)


PROTOCOL_LABELS = {'2d': '2D episodes', 'volumetric': 'volumetric (Q-Net), 3D Dice'}


class Cell(NamedTuple):
    r"""One test of a trained run: target benchmark, protocol, shots, and the test-time alpha (None: its own)."""
    target: str
    protocol: str
    shots: int
    alpha: float | None


def run_cell(args, run: Path, name: str, method: str, cdtg: str, cell: Cell) -> dict | None:
    r"""One test.py run (or its results from an earlier identical run) -> one table row; a dry run prints the
    command if the cell still needs it and returns None."""
    target, protocol, shots, alpha = cell
    tag = (f'test-{target}' + ('-volumetric' if protocol == 'volumetric' else '') + f'-{shots}shot'
           + (f'-alpha{alpha:g}' if alpha is not None else ''))
    cmd = ['--load', str(run / 'best.pt'), '--benchmark', target, '--datapath', args.datapath, '--nshot', str(shots),
           '--seed', str(args.seed), '--logpath', str(run / tag)]
    if protocol == 'volumetric':
        cmd += ['--protocol', 'volumetric']
    elif args.episodes is not None:
        cmd += ['--episodes', str(args.episodes)]
    cmd += (['--alpha', str(alpha)] if alpha is not None else []) + args.test_args.split()
    res = finished_cell(run / tag, run / 'best.pt', cmd) if (run / 'best.pt').exists() else None
    if args.dry_run:
        if res is None:
            print(shlex.join(command('test.py', cmd, args.gpus)))
        return None
    if res is None:
        res = launch('test.py', cmd, args.gpus)
        if res is None:                                                   # run under torchrun
            res = json.loads((run / tag / 'results.json').read_text())
        (run / tag / 'grid-cell.json').write_text(json.dumps(cmd) + '\n')
    else:
        print(f'{tag} of {name}: reusing {run / tag / "results.json"}')
    used = (res.get('plugin') or {}).get('config', {}).get('alpha')
    return {'method': method, 'cdtg': cdtg, 'alpha': used if cdtg == 'on' else '', 'target': target,
            'protocol': protocol, 'shots': shots, 'miou': round(res['miou'], 2), 'fbiou': round(res['fbiou'], 2),
            'dice': round(res['dice'], 2)}


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--methods', nargs='+', default=['hsnet', 'patnet'])
    p.add_argument('--cdtg', nargs='+', default=['off', 'on'], choices=['off', 'on'])
    p.add_argument('--benchmark', default='pascal', help='source benchmark to train on')
    p.add_argument('--targets', nargs='+', required=True, help='benchmarks to test on')
    p.add_argument('--shots', nargs='+', type=int, default=[1, 5])
    p.add_argument('--alphas', nargs='*', type=float, default=[],
                   help='also test fixed-fusion CD-TG models at these image weights (alpha sweep)')
    p.add_argument('--datapath', default='datasets')
    p.add_argument('--logroot', default='logs/grid')
    p.add_argument('--episodes', type=int, default=None, help="2D test episodes (default: test.py's, 600)")
    p.add_argument('--seed', type=int, default=0, help='seed of the test episode lists')
    p.add_argument('--test-args', default='', help='extra test.py flags, as one string (e.g. "--bsz 8 --workers 2")')
    p.add_argument('--gpus', type=int, default=1,
                   help='1: run train/test in this process; N > 1: under torchrun --nproc_per_node N')
    p.add_argument('--dry-run', action='store_true', help='print the train/test commands still needed; run nothing')
    args = p.parse_args(argv)
    if args.gpus < 1:
        raise UserError(f'--gpus must be an integer >= 1, got {args.gpus} (use --device cpu in the train/test '
                        'arguments for CPU runs)')
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise UserError(f'--methods {", ".join(unknown)}: unknown; choose from {", ".join(METHODS)}')
    root = Path(args.logroot)
    rows = []
    for method in args.methods:
        for cdtg in args.cdtg:
            name = f'{method}{"-cdtg" if cdtg == "on" else ""}'
            run = root / name
            if not (run / 'best.pt').exists():
                if (run / 'last.pt').exists():
                    raise UserError(f'{run} holds an unfinished run; continue it with '
                                    f'train.py --resume --logpath {run}')
                train_args = (['--method', method, '--benchmark', args.benchmark, '--datapath', args.datapath,
                               '--logpath', str(run)] + (['--cdtg'] if cdtg == 'on' else []) + passthrough)
                if args.dry_run:
                    print(shlex.join(command('train.py', train_args, args.gpus)))
                else:
                    launch('train.py', train_args, args.gpus)
            sweep = cdtg == 'on' and METHODS.declared(method, 'plugin_point') == 'prototypes'
            if args.alphas and cdtg == 'on' and not sweep:
                print(f'{name}: no alpha sweep (alpha has no image-weight meaning on a {method} host)')
            alphas = [None] + (args.alphas if sweep else [])
            for spec in args.targets:
                target, protocols = target_protocols(spec)
                for protocol in protocols:
                    for shots in args.shots:
                        for alpha in alphas:
                            row = run_cell(args, run, name, method, cdtg, Cell(target, protocol, shots, alpha))
                            if row is not None:
                                rows.append(row)
    if args.dry_run:
        return rows
    root.mkdir(parents=True, exist_ok=True)
    with open(root / 'grid.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ['| method | CD-TG | alpha | target | protocol | shots | mIoU | FB-IoU | Dice |',
             '|---|---|---|---|---|---|---|---|---|']
    lines += [f'| {r["method"]} | {r["cdtg"]} | {r["alpha"]} | {r["target"]} | {PROTOCOL_LABELS[r["protocol"]]} | '
              f'{r["shots"]} | {r["miou"]:.2f} | {r["fbiou"]:.2f} | {r["dice"]:.2f} |' for r in rows]
    (root / 'grid.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return rows


if __name__ == '__main__':
    run_cli(main)
