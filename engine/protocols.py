r"""Evaluation protocols of test.py: what episodes a benchmark is scored on, and how.

    '2d'          pre-sampled 2D episodes (every benchmark): class-wise accumulated IoU, FB-IoU, Dice.
    'volumetric'  the 5-fold volumetric protocol of the volumetric benchmarks (chaos, abd-ct, cmr: those whose
                  `protocols` include it) with 3D Dice per organ (Q-Net's; engine/volumetric.py).

A protocol checks test.py's flags against the benchmark before any data is read (`check`), is then built from the
dataset, runs the model (always through its test-time entry point) and adds what it did to results.json.
"""
import argparse
import warnings

from common import names
from common.errors import UserError
from data import FixedEpisodes, benchmarks_with_protocol, build_loader
from engine.loops import DEGENERATE_SUPPORTS, Runtime, evaluate
from engine.volumetric import evaluate_volumetric


class EpisodeProtocol:
    r"""`--episodes` class-balanced 2D episodes pre-sampled from `--seed` in the main process (default: the
    benchmark's number, 600, or what its protocol fixes, e.g. every image once for `--wbc-protocol cdtg`)."""
    name = '2d'
    tag = ''

    @staticmethod
    def check(dataset_cls, args: argparse.Namespace) -> None:
        r"""Every benchmark has 2D episodes."""
        if getattr(args, 'volumetric_support', None) is not None:
            raise UserError('--volumetric-support chooses the support volume of --protocol volumetric ('
                            f'{", ".join(benchmarks_with_protocol("volumetric"))}); it does not apply to 2D episodes')

    def __init__(self, dataset, args: argparse.Namespace, runtime: Runtime):
        self.dataset, self.args, self.runtime = dataset, args, runtime
        self.device, self.dist = runtime.device, runtime.dist
        short = dataset.classes_short_of_shots()
        if short and getattr(args, 'strict_shots', False):
            raise UserError(f'--strict-shots: {args.nshot}-shot episodes need {args.nshot + 1} distinct images per '
                            f'class, but ' + ', '.join(f'{name} has {n}' for name, n in short.items())
                            + ' (drop --strict-shots to let supports repeat, or lower --nshot)')
        for name, n in short.items() if self.dist.main else ():
            warnings.warn(f'{dataset.name}: class {name!r} has {n} images, so its {args.nshot}-shot supports repeat '
                          '(recorded in results.json as repeated_supports; --strict-shots refuses this)', stacklevel=2)
        n = args.episodes if args.episodes is not None else dataset.default_episodes
        self.episodes = dataset.sample_episodes(n, args.seed)
        self.repeated = {}
        for e in self.episodes:
            if len(set(e.supports)) < len(e.supports) or e.query in e.supports:
                name = dataset.class_names[e.class_id]
                self.repeated[name] = self.repeated.get(name, 0) + 1

    @property
    def unit(self) -> str:
        return f'{len(self.episodes)} episodes'

    def run(self, model) -> tuple[dict, list[dict]]:
        r"""Each process evaluates episodes[rank::world]; scores are all-reduced; the drawn episodes are the first
        `--vis` of the whole list, gathered from the processes."""
        dist = self.dist
        loader = build_loader(self.dataset, FixedEpisodes(dist.shard(self.episodes)), self.args.bsz,
                              self.args.workers, self.device.type == 'cuda')
        scores, kept = evaluate(model, loader, self.runtime, self.dataset.class_names, desc='test',
                                keep_predictions=self.args.vis, miou_over=self.args.miou_over)
        if dist.enabled:
            gathered = dist.all_gather_object([(dist.rank + i * dist.world, k) for i, k in enumerate(kept)])
            kept = [k for _, k in sorted((item for part in gathered for item in part), key=lambda x: x[0])]
            kept = kept[:self.args.vis]
        return scores, kept

    def conventions(self) -> dict:
        return {}

    def results(self, scores: dict) -> dict:
        return {'episodes': [e.to_json(self.dataset.class_names) for e in self.episodes],
                'episodes_per_rank': [len(self.episodes[r::self.dist.world]) for r in range(self.dist.world)],
                'repeated_supports': self.repeated,
                **{f'{kind}_support_masks': scores.get(f'{kind}_support_masks', 0) for kind in DEGENERATE_SUPPORTS}}


class VolumetricProtocol:
    r"""The volumetric protocol (see engine/volumetric.py): 3D Dice per organ and query volume."""
    name = 'volumetric'
    tag = '-volumetric'

    @staticmethod
    def check(dataset_cls, args: argparse.Namespace) -> None:
        if 'volumetric' not in getattr(dataset_cls, 'protocols', ('2d',)):
            raise UserError('--protocol volumetric applies to volumetric benchmarks '
                            f'({", ".join(benchmarks_with_protocol("volumetric"))}), not {args.benchmark!r}')
        if args.vis:
            raise UserError('--vis draws 2D episodes; it does not apply to --protocol volumetric')

    def __init__(self, dataset, args: argparse.Namespace, runtime: Runtime):
        self.dataset, self.args, self.runtime = dataset, args, runtime
        self.device, self.dist = runtime.device, runtime.dist
        self.support_rule = args.volumetric_support or 'qnet'
        self.tasks: list[dict] = []

    @property
    def unit(self) -> str:
        return f'volumetric protocol (5 folds, {self.support_rule} support volume)'

    def run(self, model) -> tuple[dict, list[dict]]:
        scores, self.tasks = evaluate_volumetric(model, self.dataset, self.runtime, self.args.nshot, self.args.bsz,
                                                 desc='test', support_rule=self.support_rule,
                                                 miou_over=self.args.miou_over)
        return scores, []

    def conventions(self) -> dict:
        return {'volumetric_support': self.support_rule}

    def results(self, scores: dict) -> dict:
        return {'episodes': self.tasks, 'tasks': self.tasks, 'per_fold': scores['per_fold']}


#: --protocol name -> its class, from the torch-free list.
PROTOCOLS = {name: globals()[cls] for name, cls in names.PROTOCOLS.items()}
