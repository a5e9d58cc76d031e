r"""Paper-style tables and figures from grid folders (scripts/grid.py, scripts/ablations/*.sh).

    python scripts/report.py logs/ablations/main_table --datapath DATA
    python scripts/report.py logs/ablations/alpha_sweep-synthetic --datapath datasets --out docs/figures/synthetic

Reads every test cell (`results.json` written by test.py) under the given folders and writes into --out (default
<first folder>/report, replaced as a whole at the end, never half-written):

* table.md / table.tex / table.csv: one row per method and CD-TG variant (the baseline first), one column per target
  and K, the mean over targets per K and, on CD-TG rows, the change of that mean over the method's baseline (Δ).
  Cells are the mean ± sample standard deviation over seeds (training seed x test-episode seed) when several exist;
  the best value of each column is in bold. Only cells tested at the checkpoint's own α enter the table;
  cells.csv lists every cell group (α overrides included) with mean, std, n and seeds;
* alpha_sweep.png/.pdf: the metric against α per target (columns) and K (rows), one line per method: test-time α
  overrides of the fixed-fusion CD-TG model (solid), models retrained at each α (dotted, if any), the baseline
  (dashed);
* cdtg_bars.png/.pdf: baseline vs +CD-TG per method and target (error bars: std over seeds);
* qualitative.png/.pdf (needs --datapath and the checkpoints): image | ground truth | baseline | +CD-TG, one row per
  target, on the *same* test episodes for both models, drawn at random with --seed from the cells' episode list (not
  picked by result); `--sort-by-gain` instead shows the episodes where CD-TG gains most, and the caption says so;
* report.md: all of it with captions.

Variants are named from the checkpoints' settings: '+CD-TG' is the default plug-in, anything else is spelled out
('+CD-TG (attn attributes)', '+CD-TG (trained α=0.3)', ...), and method options or a backbone other than the
method's default extend the method's name.
"""
import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import bounded, parse_with_config  # noqa: E402
from common.errors import UserError, run_cli  # noqa: E402
from common.logger import staged_folder  # noqa: E402
from common.paths import check_apart_from_inputs  # noqa: E402

METRICS = {'miou': 'mIoU', 'fbiou': 'FB-IoU', 'dice': 'Dice'}
TARGET_NAMES = {'isic': 'ISIC', 'lung': 'Chest X-ray', 'wbc': 'WBC', 'chaos': 'CHAOS', 'abd-ct': 'ABD-CT',
                'cmr': 'Cardiac MRI', 'kvasir': 'Kvasir-SEG', 'deepglobe': 'Deepglobe', 'fss': 'FSS-1000'}
TARGET_ORDER = ('isic', 'lung', 'wbc', 'chaos', 'abd-ct', 'cmr', 'kvasir', 'deepglobe', 'fss')
#: How a table names a text encoder other than the default (`--clip`; scripts/ablations/text_encoders.sh).
ENCODER_NAMES = {'biomedclip': 'BiomedCLIP', 'pubmedclip': 'PubMedCLIP'}
PLUGIN_DEFAULTS = {'clip': 'ViT-B-32', 'attn': 'paper', 'fusion': 'fixed', 'style_aug': True, 'text_lora': 0,
                   'maps': False, 'width': None, 'background': 'domain', 'descriptions': None, 'text_bias': 'bounded',
                   'text_ratio': 0.3, 'text': 'descriptions', 'lr_scale': None, 'weight_decay': 0.01,
                   'grad_clip': 1.0}
#: What a plug-in record written before a setting existed means by its absence (the text bias was the template's).
PLUGIN_LEGACY = {'text_bias': 'template'}
DEFAULT_ALPHA = 0.7


# --- reading the cells ----------------------------------------------------------------------------------------------
@dataclass
class Cell:
    r"""One test.py result: what was tested, how, and the scores."""
    path: Path                      # the cell folder
    method: str                     # method label (with non-default options/backbone)
    base_method: str
    variant: str                    # 'baseline', '+CD-TG', '+CD-TG (...)'
    settings: tuple                 # plug-in settings that name the variant, without the trained alpha
    cdtg: bool
    trained_alpha: float | None
    alpha: float | None             # the α the cell was tested at
    override: bool                  # tested at an α other than the checkpoint's own (test.py --alpha)
    fusion: str | None
    benchmark: str
    protocol: str
    shots: int
    seeds: tuple                    # (training seed, test-episode seed)
    scores: dict
    results: dict = field(repr=False)

    @property
    def target(self) -> str:
        return self.benchmark + (f':{self.protocol}' if self.protocol != '2d' else '')


def target_label(target: str) -> str:
    name, _, protocol = target.partition(':')
    label = TARGET_NAMES.get(name, name)
    return f'{label} (3D)' if protocol == 'volumetric' else (f'{label} ({protocol})' if protocol else label)


def target_key(target: str) -> tuple:
    name, _, protocol = target.partition(':')
    return (TARGET_ORDER.index(name) if name in TARGET_ORDER else len(TARGET_ORDER), name, protocol)


def _yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _method_label(results: dict) -> str:
    r"""The method name, extended by options and backbone that differ from the method's defaults."""
    method = results['method']
    try:
        from model import method_class
        cls = method_class(method)
    except UserError:
        return method
    import dataclasses
    defaults = {f.name: f.default for f in dataclasses.fields(cls.Options)}
    extra = [f'{k}={v}' for k, v in sorted((results.get('method_options') or {}).items())
             if k in defaults and v != defaults[k]]
    if results.get('backbone') and results['backbone'] != cls.default_backbone:
        extra.append(results['backbone'])
    return f'{method} ({", ".join(extra)})' if extra else method


def _variant(plugin: dict | None, trained_alpha: float | None) -> tuple[str, tuple]:
    if not plugin:
        return 'baseline', ()
    config = plugin.get('config', {})
    settings = []
    for key, default in PLUGIN_DEFAULTS.items():
        value = config.get(key, PLUGIN_LEGACY.get(key, default))
        if value == default:
            continue
        if key == 'style_aug':
            settings.append('no style aug')
        elif key == 'text_lora':
            settings.append(f'LoRA {value}')
        elif key == 'clip':
            settings.append(ENCODER_NAMES.get(value, f'CLIP {value}'))
        elif key == 'maps':
            settings.append('aligned maps')
        elif key == 'descriptions':
            settings.append(f'descriptions {Path(value).name}')
        elif key == 'text':
            settings.append(f'{value} text')
        elif key in ('text_bias', 'text_ratio', 'lr_scale', 'weight_decay', 'grad_clip'):
            settings.append(f'{key.replace("_", " ")} {value:g}' if isinstance(value, float) else
                            f'{key.replace("_", " ")} {value}')
        else:
            settings.append(f'{key} {value}')
    name = list(settings)
    if trained_alpha is not None and not math.isclose(trained_alpha, DEFAULT_ALPHA):
        name.append(f'trained α={trained_alpha:g}')
    return '+CD-TG' + (f' ({", ".join(name)})' if name else ''), tuple(settings)


def read_cell(results_path: Path) -> Cell | None:
    r"""A cell from its results.json (None for files that are not test.py results)."""
    try:
        results = json.loads(results_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(results, dict) or not {'method', 'benchmark', 'nshot', 'miou'} <= set(results):
        return None
    folder = results_path.parent
    test_config = _yaml(folder / 'config.yaml')
    checkpoint = locate_checkpoint(results, folder)
    # the training run's config.yaml (its seed and α) sits next to the checkpoint, i.e. above the cell in a grid;
    # read it even when the checkpoints were deleted to save space
    recorded = Path(results.get('checkpoint', '')).parent
    run_dir = checkpoint.parent if checkpoint else (recorded if (recorded / 'config.yaml').is_file() else folder.parent)
    run_config = _yaml(run_dir / 'config.yaml')
    plugin = results.get('plugin')
    config = (plugin or {}).get('config', {})
    used = config.get('alpha') if plugin else None
    override = plugin is not None and test_config.get('alpha') is not None
    # config.yaml holds the plug-in's settings as their own section (runs before that: flat keys)
    section = run_config.get('cdtg') if isinstance(run_config.get('cdtg'), dict) else run_config
    trained = section.get('alpha', used if not override else None) if plugin else None
    if plugin and config.get('fusion') == 'learned':
        trained, used = None, None                 # a learned gate has no single α
    variant, settings = _variant(plugin, trained)
    train_seed = run_config.get('seed', str(checkpoint or results.get('checkpoint')))     # unknown: one per run
    return Cell(path=folder, method=_method_label(results), base_method=results['method'], variant=variant,
                settings=settings, cdtg=bool(plugin), trained_alpha=trained, alpha=used, override=override,
                fusion=config.get('fusion') if plugin else None, benchmark=results['benchmark'],
                protocol=results.get('protocol', '2d'), shots=int(results['nshot']),
                seeds=(train_seed, results.get('seed')), scores={k: results.get(k) for k in METRICS},
                results=results)


def locate_checkpoint(results: dict, folder: Path) -> Path | None:
    r"""The cell's checkpoint: as recorded, or (a moved grid folder) best.pt of the run folder above the cell."""
    recorded = Path(results.get('checkpoint', ''))
    for candidate in (recorded, folder.parent / recorded.name):
        if recorded.name and candidate.is_file():
            return candidate
    return None


def collect(folders: list[Path]) -> list[Cell]:
    cells = []
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f'{folder} is not a folder (pass grid folders: --logroot of scripts/grid.py or OUT of '
                            'scripts/ablations/*.sh)')
        found = [c for c in (read_cell(p) for p in sorted(folder.rglob('results.json'))) if c is not None]
        if not found:
            raise UserError(f'{folder} holds no test results (results.json written by test.py); run the grid first')
        cells.extend(found)
    return cells


# --- aggregation ----------------------------------------------------------------------------------------------------
@dataclass
class Stat:
    mean: float
    std: float | None               # sample std (n > 1)
    n: int
    seeds: list

    def text(self, digits: int = 1) -> str:
        return f'{self.mean:.{digits}f}' + (f' ± {self.std:.{digits}f}' if self.std is not None else '')


def aggregate(cells: list[Cell], metric: str) -> tuple[Stat, int]:
    r"""Mean and sample std over distinct seeds; cells repeating a (training seed, test seed) pair (the same model
    tested twice, e.g. a retrained α equal to the default) count once. Returns (stat, duplicates dropped)."""
    seen, values = {}, []
    for c in cells:
        if c.seeds in seen or c.scores.get(metric) is None:
            continue
        seen[c.seeds] = True
        values.append(float(c.scores[metric]))
    dropped = len(cells) - len(values)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return Stat(float(np.mean(values)), std, len(values), [list(s) for s in seen]), dropped


def method_order(cells: list[Cell]) -> list[str]:
    try:
        from model import METHODS
        registry = list(METHODS)
    except ImportError:
        registry = []
    labels = sorted({(c.base_method, c.method) for c in cells},
                    key=lambda x: (registry.index(x[0]) if x[0] in registry else len(registry), x[0], x[1]))
    return [label for _, label in labels]


def variant_key(variant: str) -> tuple:
    return (variant != 'baseline', variant != '+CD-TG', variant)


@dataclass
class Table:
    rows: list[tuple[str, str]]                 # (method label, variant)
    columns: list[tuple[str, int]]              # (target, shots)
    shots: list[int]
    cells: dict                                 # (row, column) -> Stat
    means: dict                                 # (row, shots) -> float (mean over the targets; all present)
    deltas: dict                                # (row, shots) -> float (CD-TG row mean - baseline mean)
    metric: str
    notes: list[str]

    def best(self) -> dict:
        r"""Per column (and per Mean column), the best value (bold)."""
        out = {}
        for col in self.columns:
            values = [self.cells[(r, col)].mean for r in self.rows if (r, col) in self.cells]
            if len(values) > 1:
                out[col] = max(round(v, 1) for v in values)
        for k in self.shots:
            values = [self.means[(r, k)] for r in self.rows if (r, k) in self.means]
            if len(values) > 1:
                out[('mean', k)] = max(round(v, 1) for v in values)
        return out


def build_table(cells: list[Cell], metric: str) -> Table:
    own = [c for c in cells if not c.override]
    groups: dict = defaultdict(list)
    for c in own:
        groups[((c.method, c.variant), (c.target, c.shots))].append(c)
    methods = method_order(own)
    rows = sorted({key[0] for key in groups}, key=lambda r: (methods.index(r[0]), variant_key(r[1])))
    columns = sorted({key[1] for key in groups}, key=lambda col: (target_key(col[0]), col[1]))
    shots = sorted({k for _, k in columns})
    stats, notes = {}, []
    for key, members in groups.items():
        stats[key], dropped = aggregate(members, metric)
        if dropped:
            notes.append(f'{key[0][0]} {key[0][1]}, {target_label(key[1][0])} {key[1][1]}-shot: {dropped} cell(s) '
                         'repeat a seed pair already counted and were left out')
    means, deltas = {}, {}
    for row in rows:
        for k in shots:
            cols = [col for col in columns if col[1] == k]
            if all((row, col) in stats for col in cols):
                means[(row, k)] = float(np.mean([stats[(row, col)].mean for col in cols]))
    for row in rows:
        base = (row[0], 'baseline')
        for k in shots:
            if row[1] != 'baseline' and (row, k) in means and (base, k) in means:
                deltas[(row, k)] = means[(row, k)] - means[(base, k)]
    return Table(rows, columns, shots, stats, means, deltas, metric, notes)


# --- table writers --------------------------------------------------------------------------------------------------
def _row_name(row: tuple[str, str]) -> str:
    method, variant = row
    return method if variant == 'baseline' else f'{method} {variant}'


def _bold(text: str, on: bool, fmt: str) -> str:
    if not on:
        return text
    return f'**{text}**' if fmt == 'md' else f'\\textbf{{{text}}}'


def table_markdown(t: Table) -> str:
    best = t.best()
    multi = len(t.shots) > 1
    head = ['Method'] + [f'{target_label(tg)} {k}-shot' for tg, k in t.columns]
    head += [f'Mean {k}-shot' if multi else 'Mean' for k in t.shots]
    head += [f'Δ {k}-shot' if multi else 'Δ' for k in t.shots]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' + '---:|' * (len(head) - 1)]
    for row in t.rows:
        lines.append('| ' + ' | '.join(_row_cells(t, row, best, 'md')) + ' |')
    return '\n'.join(lines) + '\n'


def _row_cells(t: Table, row: tuple[str, str], best: dict, fmt: str) -> list[str]:
    r"""One row of the table in `fmt` ('md' or 'tex'): its name, mean ± std per column, the mean over the targets
    per K and the change from the method's baseline per K; the best value of a column in bold."""
    empty, escape = ('–', str) if fmt == 'md' else ('--', _tex)
    out = [escape(_row_name(row))]
    for col in t.columns:
        s = t.cells.get((row, col))
        out.append(empty if s is None else _bold(escape(s.text()), round(s.mean, 1) == best.get(col), fmt))
    for k in t.shots:
        m = t.means.get((row, k))
        out.append(empty if m is None else _bold(f'{m:.1f}', round(m, 1) == best.get(('mean', k)), fmt))
    for k in t.shots:
        d = t.deltas.get((row, k))
        out.append('' if d is None else f'{d:+.1f}')
    return out


def _tex(text: str) -> str:
    return (text.replace('\\', '\\textbackslash{}').replace('_', '\\_').replace('%', '\\%').replace('&', '\\&')
            .replace('#', '\\#').replace('α', '$\\alpha$').replace('Δ', '$\\Delta$').replace('±', '$\\pm$'))


def table_latex(t: Table, caption: str) -> str:
    best = t.best()
    targets = sorted({tg for tg, _ in t.columns}, key=target_key)
    spans = [(tg, [k for g, k in t.columns if g == tg]) for tg in targets]
    ncol = len(t.columns) + 2 * len(t.shots)
    lines = ['% generated by scripts/report.py; needs \\usepackage{booktabs}', '\\begin{table}[t]', '\\centering',
             f'\\caption{{{_tex(caption)}}}', '\\begin{tabular}{l' + 'c' * ncol + '}', '\\toprule']
    head = ['Method'] + [f'\\multicolumn{{{len(ks)}}}{{c}}{{{_tex(target_label(tg))}}}' for tg, ks in spans]
    head += [f'\\multicolumn{{{len(t.shots)}}}{{c}}{{Mean}}', f'\\multicolumn{{{len(t.shots)}}}{{c}}{{$\\Delta$}}']
    lines.append(' & '.join(head) + ' \\\\')
    lines.append(' & '.join([''] + [f'{k}-shot' for _, k in t.columns] + [f'{k}-shot' for k in t.shots] * 2)
                 + ' \\\\')
    lines.append('\\midrule')
    previous = None
    for row in t.rows:
        if previous is not None and row[0] != previous:
            lines.append('\\midrule')
        previous = row[0]
        lines.append(' & '.join(_row_cells(t, row, best, 'tex')) + ' \\\\')
    lines += ['\\bottomrule', '\\end{tabular}', '\\end{table}']
    return '\n'.join(lines) + '\n'


def write_table_csv(t: Table, path: Path) -> None:
    r"""The table with numbers only: per column the mean, its std and n, then Mean and Δ per K."""
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        head = ['method', 'variant']
        for tg, k in t.columns:
            name = f'{target_label(tg)} {k}-shot'
            head += [name, f'{name} std', f'{name} n']
        head += [f'mean {k}-shot' for k in t.shots] + [f'delta {k}-shot' for k in t.shots]
        w.writerow(head)
        for row in t.rows:
            out = list(row)
            for col in t.columns:
                s = t.cells.get((row, col))
                out += ['', '', 0] if s is None else [f'{s.mean:.4f}', '' if s.std is None else f'{s.std:.4f}', s.n]
            out += [f'{t.means[(row, k)]:.4f}' if (row, k) in t.means else '' for k in t.shots]
            out += [f'{t.deltas[(row, k)]:.4f}' if (row, k) in t.deltas else '' for k in t.shots]
            w.writerow(out)


def write_cells_csv(cells: list[Cell], path: Path) -> None:
    r"""Every group of cells (α overrides included): mean, std, n and seeds of each metric."""
    groups: dict = defaultdict(list)
    for c in cells:
        groups[(c.method, c.variant, c.target, c.shots, c.alpha, c.override)].append(c)
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['method', 'variant', 'target', 'shots', 'alpha', 'alpha_override', 'metric', 'mean', 'std', 'n',
                    'seeds'])
        for key in sorted(groups, key=lambda k: (k[0], variant_key(k[1]), target_key(k[2]), k[3], k[4] or -1)):
            for metric in METRICS:
                s, _ = aggregate(groups[key], metric)
                w.writerow([key[0], key[1], key[2], key[3], '' if key[4] is None else f'{key[4]:g}', int(key[5]),
                            metric, f'{s.mean:.4f}', '' if s.std is None else f'{s.std:.4f}', s.n,
                            json.dumps(s.seeds)])


# --- plots ----------------------------------------------------------------------------------------------------------
def _colours(methods: list[str]) -> dict:
    from engine.figures import pyplot
    cmap = pyplot().get_cmap('tab10')
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def alpha_series(cells: list[Cell], metric: str) -> dict:
    r"""{(target, shots): [(label, method, style, [(α, Stat)])]}: test-time sweeps of fixed-fusion CD-TG models,
    retrained-per-α series, and baselines (one value)."""
    out: dict = defaultdict(list)
    fixed = [c for c in cells if c.cdtg and c.fusion == 'fixed' and c.alpha is not None]
    panels = sorted({(c.target, c.shots) for c in fixed if c.override}, key=lambda p: (p[1], target_key(p[0])))
    retrained: dict = defaultdict(list)
    for c in fixed:
        if not c.override:
            retrained[(c.method, c.settings, c.target, c.shots)].append(c)
    for key, members in retrained.items():
        if len({c.trained_alpha for c in members}) > 1 and (key[2], key[3]) not in panels:
            panels.append((key[2], key[3]))
    for target, shots in panels:
        swept: dict = defaultdict(list)
        for c in fixed:
            if c.target == target and c.shots == shots:
                swept[(c.method, c.variant)].append(c)
        for (method, variant), members in sorted(swept.items()):
            if not any(c.override for c in members):
                continue
            by_alpha: dict = defaultdict(list)
            for c in members:
                by_alpha[round(c.alpha, 6)].append(c)
            points = [(a, aggregate(by_alpha[a], metric)[0]) for a in sorted(by_alpha)]
            out[(target, shots)].append((f'{method} {variant} (test-time α)', method, '-', points))
        for (method, settings, tg, k), members in sorted(retrained.items()):
            if (tg, k) != (target, shots) or len({c.trained_alpha for c in members}) < 2:
                continue
            by_alpha = defaultdict(list)
            for c in members:
                by_alpha[round(c.trained_alpha, 6)].append(c)
            points = [(a, aggregate(by_alpha[a], metric)[0]) for a in sorted(by_alpha)]
            extra = f' ({", ".join(settings)})' if settings else ''
            out[(target, shots)].append((f'{method} +CD-TG{extra} (retrained per α)', method, ':', points))
        for method in sorted({m for _, m, _, _ in out[(target, shots)]}):
            base = [c for c in cells if c.method == method and c.variant == 'baseline' and c.target == target
                    and c.shots == shots]
            if base:
                out[(target, shots)].append((f'{method} baseline', method, '--', [(None, aggregate(base, metric)[0])]))
    return out


def plot_alpha(series: dict, metric: str, path: Path) -> Path | None:
    if not series:
        return None
    from engine.figures import pyplot, save_figure
    plt = pyplot()
    targets = sorted({tg for tg, _ in series}, key=target_key)
    shots = sorted({k for _, k in series})
    colours = _colours(sorted({m for lines in series.values() for _, m, _, _ in lines}))
    fig, axes = plt.subplots(len(shots), len(targets), figsize=(4.2 * len(targets), 3.3 * len(shots)),
                             squeeze=False)
    for i, k in enumerate(shots):
        for j, tg in enumerate(targets):
            ax = axes[i][j]
            ax.set_title(f'{target_label(tg)}, {k}-shot', fontsize=10)
            for label, method, style, points in series.get((tg, k), []):
                if points[0][0] is None:
                    ax.axhline(points[0][1].mean, color=colours[method], linestyle='--', linewidth=1, label=label)
                    continue
                xs = [a for a, _ in points]
                ys = np.array([s.mean for _, s in points])
                ax.plot(xs, ys, style, marker='o' if style == '-' else 's', markersize=4, color=colours[method],
                        label=label)
                sd = np.array([s.std if s.std is not None else np.nan for _, s in points])
                if np.isfinite(sd).any():
                    ax.fill_between(xs, ys - np.nan_to_num(sd), ys + np.nan_to_num(sd), color=colours[method],
                                    alpha=0.15, linewidth=0)
            ax.set_xlabel('α (image weight; text weight 1 − α)')
            ax.set_ylabel(f'{METRICS[metric]} (%)')
            ax.set_xlim(-0.03, 1.03)
            ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]), top=max(1.0, ax.get_ylim()[1]))   # scores are >= 0
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = {}
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(lab, h)
    handles, labels = list(seen.values()), list(seen)
    fig.legend(handles, labels, loc='lower center', ncol=min(3, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.025 * ((len(labels) - 1) // 3), 1, 1))
    return save_figure(fig, path, dpi=110, formats=('pdf',))


def plot_bars(t: Table, path: Path) -> Path | None:
    r"""Baseline vs the default +CD-TG per method and target, one panel per K."""
    rows = [r for r in t.rows if r[1] in ('baseline', '+CD-TG')]
    methods = [m for m in dict.fromkeys(r[0] for r in rows)
               if (m, 'baseline') in rows and (m, '+CD-TG') in rows]
    if not methods:
        return None
    from engine.figures import pyplot, save_figure
    plt = pyplot()
    colours = _colours(methods)
    fig, axes = plt.subplots(1, len(t.shots), figsize=(max(5.0, 1.6 * len(t.columns)) + 1, 3.6), squeeze=False)
    width = 0.8 / (2 * len(methods))
    for ax, k in zip(axes[0], t.shots):
        targets = [tg for tg, kk in t.columns if kk == k]
        x = np.arange(len(targets))
        for i, m in enumerate(methods):
            for j, variant in enumerate(('baseline', '+CD-TG')):
                stats = [t.cells.get(((m, variant), (tg, k))) for tg in targets]
                ys = [s.mean if s else np.nan for s in stats]
                err = [s.std if s and s.std is not None else 0.0 for s in stats]
                ax.bar(x + (2 * i + j - len(methods) + 0.5) * width, ys, width, yerr=err, capsize=2,
                       color=colours[m], alpha=0.45 if variant == 'baseline' else 1.0,
                       hatch='//' if variant == 'baseline' else None, edgecolor='black', linewidth=0.4,
                       label=f'{m} {variant}')
        ax.set_xticks(x, [target_label(tg) for tg in targets], fontsize=8)
        ax.set_ylabel(f'{METRICS[t.metric]} (%)')
        ax.set_title(f'{k}-shot', fontsize=10)
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
        ax.grid(axis='y', alpha=0.3)
    axes[0][-1].legend(fontsize=7, frameon=False, loc='upper left', bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return save_figure(fig, path, dpi=110, formats=('pdf',))


# --- qualitative figure ---------------------------------------------------------------------------------------------
def figure_pairs(cells: list[Cell], method: str | None, shots: int | None) -> tuple[str, int, list]:
    r"""(method, K, [(target, baseline cell, CD-TG cell)]) for the qualitative figure: the default +CD-TG model and
    its baseline, tested on the same 2D episode list, at the lowest training seed."""
    own = [c for c in cells if not c.override and c.protocol == '2d' and c.variant in ('baseline', '+CD-TG')]
    methods = [m for m in method_order(own)
               if {'baseline', '+CD-TG'} <= {c.variant for c in own if c.method == m}]
    if method is not None:
        if method not in methods:
            raise UserError(f'--figure-method {method}: no method with both a baseline and a +CD-TG cell of the 2D '
                            f'protocol (have: {", ".join(methods) or "none"})')
        methods = [method]
    if not methods:
        return '', 0, []
    method = methods[0]
    mine = [c for c in own if c.method == method]
    both = sorted({c.shots for c in mine if c.variant == 'baseline'} & {c.shots for c in mine if c.cdtg})
    if shots is not None and shots not in both:
        raise UserError(f'--figure-shots {shots}: {method} has baseline and +CD-TG cells for K in {both}')
    k = shots if shots is not None else both[0]
    pairs = []
    for target in sorted({c.target for c in mine}, key=target_key):
        def pick(variant):
            found = sorted((c for c in mine if c.target == target and c.shots == k and c.variant == variant),
                           key=lambda c: (str(c.seeds[0]), str(c.seeds[1])))
            return found[0] if found else None
        base, text = pick('baseline'), pick('+CD-TG')
        if base is None or text is None:
            continue
        if base.results.get('episodes') != text.results.get('episodes'):
            raise UserError(f'{base.path} and {text.path} were tested on different episode lists (seed or '
                            '--episodes differ); the qualitative figure compares the same episodes')
        pairs.append((target, base, text))
    return method, k, pairs


def _load(cell: Cell, device, args: argparse.Namespace):
    from engine.factory import load_model
    checkpoint = locate_checkpoint(cell.results, cell.path)
    if checkpoint is None:
        raise UserError(f'the checkpoint of {cell.path} ({cell.results.get("checkpoint")}) is gone; the qualitative '
                        'figure re-predicts the episodes with it (or pass --no-figure)')
    ns = argparse.Namespace(alpha=None, clip_weights=args.clip_weights, text_cache=args.text_cache, cdtg=False)
    model, _ = load_model(str(checkpoint), device, ns)
    tta = cell.results.get('test_time_adaptation') or {}
    if tta.get('steps'):
        model.set_test_time(finetune_steps=tta['steps'], finetune_lr=tta.get('lr'))
    else:
        model.set_test_time(finetune_steps=0)
    return model


def predict_episodes(cell: Cell, model, dataset, indices: list[int], device) -> list[dict]:
    r"""The cell's episodes `indices`, predicted again through the test-time entry point."""
    import torch

    from common.utils import seed_everything, to_device
    from data import Episode
    from data.episodic import collate_episodes
    from engine.loops import episode_inputs
    model.hooks.bind(dataset.name, dataset.class_names)
    out = []
    with torch.no_grad():
        for i in indices:
            e = cell.results['episodes'][i]
            seed_everything(int(cell.results.get('seed') or 0) + i)        # identical draws for both models
            batch = collate_episodes([dataset.load_episode(Episode(int(e['class_id']), e['query'],
                                                                   tuple(e['supports'])))])
            pred = model.segment(model.infer_episode(*episode_inputs(to_device(batch, device))))[0].cpu()
            out.append({'query_img': batch['query_img'][0], 'query_mask': batch['query_mask'][0], 'pred': pred,
                        'class': e['class'], 'index': i, 'query': e['query']})
    return out


def qualitative(cells: list[Cell], args: argparse.Namespace, path: Path) -> tuple[Path | None, str]:
    from common.utils import resolve_device
    from data import build_dataset
    from engine.figures import episode_iou, pyplot, save_figure, tint, to_rgb
    method, k, pairs = figure_pairs(cells, args.figure_method, args.figure_shots)
    if not pairs:
        return None, 'no qualitative figure: no method has a baseline and a +CD-TG cell on the same 2D episodes'
    device = resolve_device(args.device)
    rng = np.random.default_rng(args.seed)
    rows = []
    models = {}
    for target, base, text in pairs:
        r = base.results
        dataset = build_dataset(r['benchmark'], args.datapath, r.get('split', 'test'), k, int(r['img_size']),
                                **(r.get('dataset_options') or {}))
        n = len(r['episodes'])
        for cell in (base, text):
            key = str(locate_checkpoint(cell.results, cell.path))
            if key not in models:
                models[key] = _load(cell, device, args)
        m_base = models[str(locate_checkpoint(base.results, base.path))]
        m_text = models[str(locate_checkpoint(text.results, text.path))]
        if args.sort_by_gain:
            pool = list(range(min(n, args.candidates)))
            b_eps = predict_episodes(base, m_base, dataset, pool, device)
            t_eps = predict_episodes(text, m_text, dataset, pool, device)
            gains = [episode_iou(t['pred'], t['query_mask']) - episode_iou(b['pred'], b['query_mask'])
                     for b, t in zip(b_eps, t_eps)]
            order = sorted(range(len(pool)), key=lambda i: -gains[i])[:args.per_target]
            chosen = [(b_eps[i], t_eps[i]) for i in order]
        else:
            picks = sorted(rng.choice(n, size=min(args.per_target, n), replace=False).tolist())
            chosen = list(zip(predict_episodes(base, m_base, dataset, picks, device),
                              predict_episodes(text, m_text, dataset, picks, device)))
        rows.extend((target, b, t) for b, t in chosen)
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), 4, figsize=(9.2, 2.45 * len(rows) + 0.7), squeeze=False)
    for (target, b, t), ax in zip(rows, axes):
        image = to_rgb(b['query_img'])
        panels = [(image, 'image'), (tint(image, b['query_mask'], (0.1, 0.9, 0.2)), 'ground truth'),
                  (tint(image, b['pred'], (1.0, 0.15, 0.1)),
                   f'{method} (IoU {episode_iou(b["pred"], b["query_mask"]):.1f})'),
                  (tint(image, t['pred'], (1.0, 0.15, 0.1)),
                   f'+CD-TG (IoU {episode_iou(t["pred"], t["query_mask"]):.1f})')]
        for a, (picture, title) in zip(ax, panels):
            a.imshow(picture)
            a.set_xticks([])
            a.set_yticks([])
            a.set_title(title, fontsize=8)
        ax[0].set_ylabel(f'{target_label(target)}\n{b["class"]}\n(episode {b["index"]})', fontsize=8)
    how = (f'the episodes where +CD-TG gains most IoU over the baseline among the first {args.candidates} of each '
           'list (SELECTED BY RESULT, --sort-by-gain)' if args.sort_by_gain else
           f'episodes drawn at random with seed {args.seed} from each test list (not selected by result)')
    caption = (f'{method} and {method} +CD-TG, {k}-shot, on the same test episodes: {how}. Green: ground truth; '
               'red: prediction.')
    fig.suptitle(f'{method} vs +CD-TG, {k}-shot', fontsize=10)
    fig.text(0.5, 0.005, _wrap(caption, 110), ha='center', va='bottom', fontsize=7)
    fig.tight_layout(rect=(0, 0.05 + 0.01 * (len(caption) // 110), 1, 0.97))
    return save_figure(fig, path, dpi=100, formats=('pdf',)), caption


def _wrap(text: str, width: int) -> str:
    import textwrap
    return '\n'.join(textwrap.wrap(text, width))


# --- main -----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Tables and figures from grid folders.')
    p.add_argument('grids', nargs='+', help='grid folders (scripts/grid.py --logroot, scripts/ablations OUT)')
    p.add_argument('--config', type=str, default=None, help='YAML file whose keys set the defaults of these flags')
    p.add_argument('--out', type=str, default=None, help='output folder (default: <first grid>/report; replaced)')
    p.add_argument('--metric', type=str, default='miou', choices=tuple(METRICS))
    p.add_argument('--datapath', type=str, default='datasets', help='the benchmarks (for the qualitative figure)')
    p.add_argument('--no-figure', action='store_true', help='skip the qualitative figure (needs data, checkpoints)')
    p.add_argument('--figure-method', type=str, default=None, help='method of the qualitative figure (default: the '
                   'first with a baseline and a +CD-TG model)')
    bounded(p, '--figure-shots', int, None, low=1, help='K of the qualitative figure (default: the smallest)')
    bounded(p, '--per-target', int, 1, low=1, high=8, help='episodes per target in the qualitative figure')
    bounded(p, '--seed', int, 0, low=0, high=2**63 - 1, help='draws the episodes of the qualitative figure')
    p.add_argument('--sort-by-gain', action='store_true',
                   help='show the episodes where CD-TG gains most instead of random ones (the caption says so)')
    bounded(p, '--candidates', int, 100, low=1, help='--sort-by-gain: episodes of each list to consider')
    p.add_argument('--device', type=str, default='auto', help='auto | cpu | cuda | cuda:N')
    p.add_argument('--clip-weights', type=str, default=None, help='CLIP weights on this machine (CD-TG models)')
    p.add_argument('--text-cache', type=str, default=None, help='folder of the frozen text-embedding cache')
    return p


def main(argv=None) -> dict:
    args = parse_with_config(build_parser(), argv)
    grids = [Path(g) for g in args.grids]
    cells = collect(grids)
    out = Path(args.out) if args.out else grids[0] / 'report'
    label = METRICS[args.metric]
    table = build_table(cells, args.metric)
    caption = (f'{label} (%) per target and K; mean ± sample std over seeds where several exist; best per column in '
               'bold; Mean: over the targets of a K; Δ: change of the Mean of a +CD-TG row over its baseline.')
    check_apart_from_inputs(out, '--out', [('grid', g) for g in grids], inside_ok=True)
    with staged_folder(out, '--out', 'report.py', replace=True) as tmp:
        md = table_markdown(table)
        (tmp / 'table.md').write_text(md)
        (tmp / 'table.tex').write_text(table_latex(table, caption))
        write_table_csv(table, tmp / 'table.csv')
        write_cells_csv(cells, tmp / 'cells.csv')
        report = [f'# Results ({", ".join(str(g) for g in grids)})', '', f'{caption}', '', md]
        report += [f'* note: {n}' for n in table.notes]
        alpha = plot_alpha(alpha_series(cells, args.metric), args.metric, tmp / 'alpha_sweep.png')
        if alpha:
            report += ['', '![alpha sweep](alpha_sweep.png)', '',
                       f'{label} against α, the image weight of the prototype fusion (text weight 1 − α): solid, one '
                       'fixed-fusion CD-TG model tested at each α (test.py --alpha); dotted, a model retrained at '
                       'each α; dashed, the baseline.']
        bars = plot_bars(table, tmp / 'cdtg_bars.png')
        if bars:
            report += ['', '![CD-TG bars](cdtg_bars.png)', '',
                       f'{label} of each method without (hatched) and with CD-TG per target; error bars: std over '
                       'seeds.']
        figure = None
        if not args.no_figure:
            figure, fig_caption = qualitative(cells, args, tmp / 'qualitative.png')
            report += ['', '![qualitative](qualitative.png)' if figure else '', '', fig_caption]
        (tmp / 'report.md').write_text('\n'.join(report) + '\n')
        written = sorted(p.name for p in tmp.iterdir())
    print(md)
    for n in table.notes:
        print(f'note: {n}')
    print(f'{len(cells)} cells -> {out}: {", ".join(written)}')
    return {'table': table, 'out': out, 'files': written, 'alpha_plot': bool(alpha), 'figure': bool(figure)}


if __name__ == '__main__':
    run_cli(main)
