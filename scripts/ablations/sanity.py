r"""The report of scripts/ablations/sanity.sh: is CD-TG's effect on its host larger than the host's own seed spread,
and do the controls behave?

    python scripts/ablations/sanity.py OUT [--methods patnet ifa] [--arms host cdtg ...] [--metric miou]

Reads OUT/seed<S>/<arm>/<method>[-cdtg]/: each target cell's results.json and the run's health.jsonl (training
health every --log-every steps). Per method, target and K (test cells) it tabulates, over the seeds:
  * each arm's score, mean ± sample std;
  * Δ = arm - host, paired by seed (mean ± std of the per-seed differences);
  * within spread: |mean Δ| <= the host's sample std over the seeds (the host's seed spread);
  * alpha1: the plug-in at alpha = 1 without style augmentation must give the host's scores to float tolerance;
  * the host's training foreground fraction: the mean predicted fraction over the last quarter of its readings
    against the quarter before (levelled off: the two differ by at most a quarter of the true fraction);
  * each CD-TG arm's last health reading: ||u||/||F|| per level and the largest cosine between the text prototypes of
    two different classes (text_proto_cos).
Writes sanity.md and sanity.json to OUT (or --out) and prints the Markdown.
"""
import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common.errors import UserError, run_cli  # noqa: E402

ARMS = ('host', 'cdtg', 'alpha1', 'random-text', 'shuffled-text', 'no-style-aug')
LABELS = {'host': 'host', 'cdtg': '+ CD-TG', 'alpha1': '+ CD-TG, α = 1, no style aug (must equal host)',
          'random-text': '+ CD-TG, random text', 'shuffled-text': '+ CD-TG, texts shuffled across classes',
          'no-style-aug': '+ CD-TG, no style augmentation'}
METRICS = {'miou': 'mIoU', 'fbiou': 'FB-IoU', 'dice': 'Dice'}
#: alpha1 equals host when their scores differ by no more than this (percentage points: float tolerance).
EQUAL_TOL = 1e-6
CELL = re.compile(r'test-(?P<target>.+?)(?P<volumetric>-volumetric)?-(?P<shots>\d+)shot$')


def run_folder(out: Path, seed: int, arm: str, method: str) -> Path:
    return out / f'seed{seed}' / arm / (method if arm == 'host' else f'{method}-cdtg')


def read_cells(folder: Path, metric: str) -> dict[tuple[str, int], float]:
    r"""{(target, shots): score} of a run's test cells (alpha overrides left out)."""
    cells = {}
    for path in sorted(folder.glob('test-*/results.json')):
        match = CELL.match(path.parent.name)
        if match is None:                                       # e.g. test-...-alpha0.5
            continue
        target = match['target'] + (':volumetric' if match['volumetric'] else '')
        cells[(target, int(match['shots']))] = float(json.loads(path.read_text())[metric])
    return cells


def read_health(folder: Path) -> list[dict]:
    path = folder / 'health.jsonl'
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def levelled(readings: list[dict]) -> dict | None:
    r"""The predicted foreground fraction of the last quarter of the readings against the quarter before; None
    without enough readings (8)."""
    fg = [r['fg_fraction'] for r in readings if r.get('fg_fraction') is not None]
    true = [r['gt_fg_fraction'] for r in readings if r.get('gt_fg_fraction') is not None]
    if len(fg) < 8:
        return None
    q = len(fg) // 4
    before, last = statistics.fmean(fg[-2 * q:-q]), statistics.fmean(fg[-q:])
    truth = statistics.fmean(true) if true else float('nan')
    return {'previous_quarter': before, 'last_quarter': last, 'true': truth,
            'levelled': abs(last - before) <= 0.25 * truth}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float('nan')


def summarise(out: Path, methods: list[str], arms: list[str], seeds: list[int], metric: str) -> list[dict]:
    r"""One entry per (method, target, shots): the arms' scores and checks."""
    entries = []
    for method in methods:
        scores = {arm: {seed: read_cells(run_folder(out, seed, arm, method), metric) for seed in seeds}
                  for arm in arms}
        cells = sorted({cell for arm in arms for per_seed in scores[arm].values() for cell in per_seed})
        host_health = {seed: levelled(read_health(run_folder(out, seed, 'host', method))) for seed in seeds}
        for cell in cells:
            host = {s: scores['host'][s][cell] for s in seeds if cell in scores['host'].get(s, {})}
            if not host:
                continue
            host_mean, host_std = mean_std(list(host.values()))
            rows = []
            for arm in arms:
                values = {s: scores[arm][s][cell] for s in seeds if cell in scores[arm].get(s, {})}
                if not values:
                    continue
                mean, std = mean_std(list(values.values()))
                row = {'arm': arm, 'seeds': sorted(values), 'scores': [values[s] for s in sorted(values)],
                       'mean': mean, 'std': std}
                if arm != 'host':
                    paired = [values[s] - host[s] for s in sorted(values) if s in host]
                    if paired:
                        delta, delta_std = mean_std(paired)
                        row.update(delta=delta, delta_std=delta_std,
                                   within_spread=abs(delta) <= host_std if not math.isnan(host_std) else None)
                        if arm == 'alpha1':
                            row['equals_host'] = max(abs(d) for d in paired) <= EQUAL_TOL
                    last = [read_health(run_folder(out, s, arm, method)) for s in sorted(values)]
                    last = [r[-1] for r in last if r]
                    cos = [r['text_proto_cos'] for r in last if r.get('text_proto_cos') is not None]
                    ratio = [max(v for v in r['u_over_f'] if v is not None) for r in last if r.get('u_over_f')]
                    if cos:
                        row['text_proto_cos'] = max(cos)
                    if ratio:
                        row['u_over_f'] = max(ratio)
                rows.append(row)
            entries.append({'method': method, 'target': cell[0], 'shots': cell[1], 'metric': metric,
                            'host_spread': host_std, 'rows': rows,
                            'host_fg': {str(s): v for s, v in host_health.items()}})
    return entries


def fmt(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '–'
    return f'{value:+.{digits}f}' if sign else f'{value:.{digits}f}'


def markdown(entries: list[dict]) -> str:
    lines = []
    for e in entries:
        name = METRICS[e['metric']]
        lines += [f'### {e["method"]} → {e["target"]}, {e["shots"]}-shot ({name}, host seed spread '
                  f'{fmt(e["host_spread"])})', '',
                  f'| arm | seeds | {name} (mean ± std) | Δ vs host (paired) | within spread? | '
                  'max cos(TP_i, TP_j) | max ‖u‖/‖F‖ |', '|---|---|---:|---:|---|---:|---:|']
        for r in e['rows']:
            within = {True: 'yes', False: 'no', None: '–'}[r.get('within_spread')]
            if r['arm'] == 'alpha1':
                within += ', equals host' if r.get('equals_host') else ', **differs from host**'
            delta = '' if r['arm'] == 'host' else f'{fmt(r.get("delta"), sign=True)} ± {fmt(r.get("delta_std"))}'
            lines.append(f'| {LABELS.get(r["arm"], r["arm"])} | {len(r["seeds"])} | {fmt(r["mean"])} ± '
                         f'{fmt(r["std"])} | {delta} | {within if r["arm"] != "host" else ""} | '
                         f'{fmt(r.get("text_proto_cos"), 3)} | {fmt(r.get("u_over_f"), 3)} |')
        fg = []
        for seed, v in e['host_fg'].items():
            fg.append(f'seed {seed}: ' + ('no readings' if v is None else
                                          f'{v["previous_quarter"]:.3f} → {v["last_quarter"]:.3f} (true '
                                          f'{v["true"]:.3f}, {"levelled" if v["levelled"] else "NOT levelled"})'))
        lines += ['', f'Host training foreground fraction, last two quarters of its readings: {"; ".join(fg)}.', '']
    return '\n'.join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('runs', metavar='OUT', help="sanity.sh's OUT folder")
    p.add_argument('--methods', nargs='+', default=['patnet', 'ifa'])
    p.add_argument('--arms', nargs='+', default=list(ARMS), choices=ARMS)
    p.add_argument('--metric', default='miou', choices=list(METRICS))
    p.add_argument('--out', default=None, help='folder of sanity.md and sanity.json (default: OUT)')
    args = p.parse_args(argv)
    out = Path(args.runs)
    seeds = sorted(int(d.name[4:]) for d in out.glob('seed*') if d.name[4:].isdigit())
    if not seeds:
        raise UserError(f'{out} holds no seed<S>/ folders of a sanity.sh run')
    if 'host' not in args.arms:
        raise UserError('--arms must include host (every change is measured against it)')
    entries = summarise(out, args.methods, args.arms, seeds, args.metric)
    if not entries:
        raise UserError(f'{out} holds no finished host test cells of {", ".join(args.methods)}')
    text = f'# CD-TG no-harm check ({out})\n\n' + markdown(entries)
    report = Path(args.out) if args.out else out
    report.mkdir(parents=True, exist_ok=True)
    (report / 'sanity.md').write_text(text)
    (report / 'sanity.json').write_text(json.dumps(entries, indent=1) + '\n')
    print(text)
    return entries


if __name__ == '__main__':
    run_cli(main)
