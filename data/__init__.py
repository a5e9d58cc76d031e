r"""Benchmark registry: name -> dataset class, and the one DataLoader builder.

Adding a benchmark = one file in data/ plus one line in DATASETS. The classes (and torch) are imported on first use,
so command lines can list and check benchmarks without them.
"""
from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

from common.errors import UserError
from common.registry import LazyRegistry

if TYPE_CHECKING:                                        # annotations only; nothing imported at run time
    from torch.utils.data import DataLoader, Sampler

    from data.episodic import EpisodicDataset

DATASETS = LazyRegistry({
    'pascal': 'data.pascal:PASCAL',
    'coco': 'data.coco:COCO',
    'synthetic': 'data.synthetic:Synthetic',
    'synthetic-med': 'data.synthetic:SyntheticMed',
    'isic': 'data.isic:ISIC',
    'lung': 'data.lung:Lung',
    'wbc': 'data.wbc:WBC',
    'kvasir': 'data.kvasir:Kvasir',
    'chaos': 'data.chaos:Chaos',
    'abd-ct': 'data.abdct:AbdCT',
    'cmr': 'data.cmr:CMR',
    'fss': 'data.fss:FSS1000',
    'deepglobe': 'data.deepglobe:Deepglobe',
})

# The episodic base, imported on first use (PEP 562): `from data import FixedEpisodes` works as usual.
_EXPORTS = ('Episode', 'EpisodicDataset', 'FixedEpisodes', 'TrainingEpisodes', 'collate_episodes')


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module('data.episodic'), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def dataset_class(name: str) -> type[EpisodicDataset]:
    r"""The class of benchmark `name` (imported now)."""
    if name not in DATASETS:
        raise UserError(f'unknown benchmark {name!r}; choose one of {", ".join(DATASETS)}')
    return DATASETS[name]


def benchmarks_with_protocol(protocol: str) -> list[str]:
    r"""The benchmarks whose `protocols` include `protocol` (e.g. 'volumetric'), read from their source (no import)."""
    return [name for name in DATASETS if protocol in DATASETS.declared(name, 'protocols', ('2d',))]


def add_dataset_args(parser) -> None:
    r"""The benchmark-specific flags, generated from what the benchmarks declare (`options`, `switches`; read from
    their source, no import). They default to None ("the benchmark's default"); a flag given for a benchmark that does
    not declare it is an error rather than silently ignored."""
    for name, (kind, helps) in _declared_options().items():
        by_help: dict[str, list[str]] = {}                  # benchmarks that say the same, together
        for bench, help in helps.items():
            by_help.setdefault(help, []).append(bench)
        text = '; '.join(f'{"/".join(benches)}: {help}' for help, benches in by_help.items())
        flag = '--' + name.replace('_', '-')
        if kind == 'switch':
            parser.add_argument(flag, action='store_true', default=None, help=text)
        else:
            parser.add_argument(flag, type=str, default=None, help=text)


@functools.lru_cache(maxsize=None)
def _declared_options() -> dict[str, tuple[str, dict[str, str]]]:
    r"""Option name -> ('value' or 'switch', {benchmark: help}), options before switches, in registry order."""
    found: dict[str, tuple[str, dict[str, str]]] = {}
    for kind, attr in (('value', 'options'), ('switch', 'switches')):
        for bench in DATASETS:
            for name, help in DATASETS.declared(bench, attr, {}).items():
                found.setdefault(name, (kind, {}))[1][bench] = help
    return found


def dataset_options(args) -> dict:
    r"""The benchmark options among parsed flags or a saved configuration (None where not given); configurations
    saved before an option existed simply lack it."""
    return {name: getattr(args, name, None) for name in _declared_options()}


def build_dataset(name: str, datapath: str, split: str, nshot: int, img_size: int, **options) -> EpisodicDataset:
    r"""Instantiate a benchmark; `options` holds benchmark-specific values (None = the benchmark's default)."""
    cls = dataset_class(name)
    given = {k: v for k, v in options.items() if v is not None}
    foreign = sorted(set(given) - set(cls.options) - set(cls.switches))
    if foreign:
        flags = ', '.join('--' + k.replace('_', '-') for k in foreign)
        raise UserError(f'{flags} does not apply to benchmark {name!r}')
    return cls(datapath, split=split, nshot=nshot, img_size=img_size, **given)


def build_loader(dataset: EpisodicDataset, sampler: Sampler, bsz: int, workers: int, pin_memory: bool = False,
                 drop_last: bool = False) -> DataLoader:
    r"""DataLoader over episodes chosen by `sampler` (FixedEpisodes / TrainingEpisodes) in the main process."""
    from torch.utils.data import DataLoader

    from data.episodic import FixedEpisodes, collate_episodes
    if isinstance(sampler, FixedEpisodes):
        dataset.reserve_cache(sampler.episodes)          # the shared image cache's pairs, before the workers start
    return DataLoader(dataset, batch_size=bsz, sampler=sampler, num_workers=workers, collate_fn=collate_episodes,
                      pin_memory=pin_memory, drop_last=drop_last, persistent_workers=workers > 0)


__all__ = ['DATASETS', 'Episode', 'EpisodicDataset', 'FixedEpisodes', 'TrainingEpisodes', 'add_dataset_args',
           'benchmarks_with_protocol', 'build_dataset', 'build_loader', 'collate_episodes', 'dataset_class',
           'dataset_options']
