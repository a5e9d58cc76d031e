r"""Benchmark registry: name -> dataset class, and the one DataLoader builder.

Adding a benchmark = one file in data/ plus one line in DATASETS. The classes (and torch) are imported on first use,
so command lines can list and check benchmarks without them.
"""
from __future__ import annotations

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
    'chaos': 'data.chaos:Chaos',
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


def add_dataset_args(parser) -> None:
    r"""Benchmark-specific flags. They default to None ("the benchmark's default"); a flag given for a benchmark
    that does not declare it in `options` is an error rather than silently ignored."""
    parser.add_argument('--fold', type=str, default=None,
                        help='pascal/coco: 0-3 (5-class / 20-class folds) or "all" (every class; default)')
    parser.add_argument('--split-file', type=str, default=None,
                        help='pascal/coco: folder with HSNet split files ({trn,val}/fold{0..3}.txt or .pkl) to use '
                             'instead of the lists derived from the masks; fss: folder with HSNet\'s '
                             '{trn,val,test}.txt class lists (default: a derived 520/240/240 class split)')
    parser.add_argument('--isic-classes', type=str, default=None,
                        help='isic: class CSV "ID,Class" (default ISIC2018/class_id.csv), or the diagnoses of the '
                             'class folders 1,2,3 in order, e.g. "nevus,melanoma,seborrheic keratosis"')
    parser.add_argument('--lung-subset', type=str, default=None,
                        help='lung: shenzhen (566 pairs; what the released PATNet/CD-TG loaders can read), montgomery '
                             '(138) or all (704; default)')
    parser.add_argument('--wbc-subset', type=str, default=None, help='wbc: 1, 2 or all (default: all, pooled)')
    parser.add_argument('--wbc-protocol', type=str, default=None,
                        help='wbc: ours (default: cytoplasm = the 128 ring, nucleus = 255, 600 class-balanced '
                             'episodes at --img-size) or cdtg (the CD-TG release: cytoplasm = mask >= 128, i.e. the '
                             'whole cell, nucleus = 255, 321x321, every image once as the query)')
    parser.add_argument('--chaos-cache', type=str, default=None,
                        help='chaos: prepared cache folder (default <datapath>/CHAOS/prepared_T2SPIR, written by '
                             'scripts/prepare_chaos.py)')
    parser.add_argument('--skip-bad', action='store_true', default=None,
                        help='isic/lung/wbc/chaos/fss/deepglobe: leave out items whose files are missing, truncated '
                             'or unreadable (with a warning that counts them) instead of stopping')


def dataset_options(args) -> dict:
    # getattr: configurations saved before a flag existed (resumed runs) simply lack it
    return {'fold': args.fold, 'split_file': args.split_file,
            **{k: getattr(args, k, None) for k in ('isic_classes', 'lung_subset', 'wbc_subset', 'wbc_protocol',
                                                   'chaos_cache', 'skip_bad')}}


def build_dataset(name: str, datapath: str, split: str, nshot: int, img_size: int, **options) -> EpisodicDataset:
    r"""Instantiate a benchmark; `options` holds benchmark-specific values (None = the benchmark's default)."""
    cls = dataset_class(name)
    given = {k: v for k, v in options.items() if v is not None}
    foreign = sorted(set(given) - set(cls.options))
    if foreign:
        flags = ', '.join('--' + k.replace('_', '-') for k in foreign)
        raise UserError(f'{flags} does not apply to benchmark {name!r}')
    return cls(datapath, split=split, nshot=nshot, img_size=img_size, **given)


def build_loader(dataset: EpisodicDataset, sampler: Sampler, bsz: int, workers: int, pin_memory: bool = False,
                 drop_last: bool = False) -> DataLoader:
    r"""DataLoader over episodes chosen by `sampler` (FixedEpisodes / TrainingEpisodes) in the main process."""
    from torch.utils.data import DataLoader

    from data.episodic import collate_episodes
    return DataLoader(dataset, batch_size=bsz, sampler=sampler, num_workers=workers, collate_fn=collate_episodes,
                      pin_memory=pin_memory, drop_last=drop_last, persistent_workers=workers > 0)


__all__ = ['DATASETS', 'Episode', 'EpisodicDataset', 'FixedEpisodes', 'TrainingEpisodes', 'add_dataset_args',
           'build_dataset', 'build_loader', 'collate_episodes', 'dataset_class', 'dataset_options']
