r"""Benchmark registry: name -> dataset class, and the one DataLoader builder.

Adding a benchmark = one file in data/ plus one line in DATASETS.
"""
from torch.utils.data import DataLoader, Sampler

from common.errors import UserError
from data.coco import COCO
from data.episodic import Episode, EpisodicDataset, FixedEpisodes, TrainingEpisodes, collate_episodes
from data.pascal import PASCAL
from data.synthetic import Synthetic, SyntheticMed

DATASETS: dict[str, type[EpisodicDataset]] = {
    'pascal': PASCAL,
    'coco': COCO,
    'synthetic': Synthetic,
    'synthetic-med': SyntheticMed,
}


def dataset_class(name: str) -> type[EpisodicDataset]:
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
                             'instead of the lists derived from the masks')


def dataset_options(args) -> dict:
    return {'fold': args.fold, 'split_file': args.split_file}


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
    return DataLoader(dataset, batch_size=bsz, sampler=sampler, num_workers=workers, collate_fn=collate_episodes,
                      pin_memory=pin_memory, drop_last=drop_last, persistent_workers=workers > 0)


__all__ = ['DATASETS', 'Episode', 'EpisodicDataset', 'FixedEpisodes', 'TrainingEpisodes', 'add_dataset_args',
           'build_dataset', 'build_loader', 'dataset_class', 'dataset_options']
