r"""Evaluation protocols of test.py: what episodes a benchmark is scored on, and how.

    '2d'          pre-sampled 2D episodes (every benchmark): class-wise accumulated IoU, FB-IoU, Dice.
    'volumetric'  CHAOS's 5-fold volumetric protocol with 3D Dice per organ (Q-Net's; engine/volumetric.py).

A protocol checks test.py's flags against the benchmark before any data is read (`check`), is then built from the
dataset, runs the model (always through its test-time entry point) and adds what it did to results.json.
"""
import argparse

import torch

from common.errors import UserError
from data import FixedEpisodes, build_loader
from engine.loops import evaluate
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
            raise UserError('--volumetric-support chooses the support volume of --protocol volumetric (chaos); it '
                            'does not apply to 2D episodes')

    def __init__(self, dataset, args: argparse.Namespace, device: torch.device):
        self.dataset, self.args, self.device = dataset, args, device
        n = args.episodes if args.episodes is not None else dataset.default_episodes
        self.episodes = dataset.sample_episodes(n, args.seed)

    @property
    def unit(self) -> str:
        return f'{len(self.episodes)} episodes'

    def run(self, model) -> tuple[dict, list[dict]]:
        loader = build_loader(self.dataset, FixedEpisodes(self.episodes), self.args.bsz, self.args.workers,
                              self.device.type == 'cuda')
        return evaluate(model, loader, self.device, self.dataset.class_names, desc='test',
                        keep_predictions=self.args.vis, miou_over=self.args.miou_over)

    def conventions(self) -> dict:
        return {}

    def results(self, scores: dict) -> dict:
        return {'episodes': [e.to_json(self.dataset.class_names) for e in self.episodes]}


class VolumetricProtocol:
    r"""CHAOS's volumetric protocol (see engine/volumetric.py): 3D Dice per organ and query volume."""
    name = 'volumetric'
    tag = '-volumetric'

    @staticmethod
    def check(dataset_cls, args: argparse.Namespace) -> None:
        if 'volumetric' not in getattr(dataset_cls, 'protocols', ('2d',)):
            raise UserError(f'--protocol volumetric applies to volumetric benchmarks (chaos), not {args.benchmark!r}')
        if args.vis:
            raise UserError('--vis draws 2D episodes; it does not apply to --protocol volumetric')

    def __init__(self, dataset, args: argparse.Namespace, device: torch.device):
        self.dataset, self.args, self.device = dataset, args, device
        self.support_rule = args.volumetric_support or 'qnet'
        self.tasks: list[dict] = []

    @property
    def unit(self) -> str:
        return f'volumetric protocol (5 folds, {self.support_rule} support volume)'

    def run(self, model) -> tuple[dict, list[dict]]:
        scores, self.tasks = evaluate_volumetric(model, self.dataset, self.device, self.args.nshot, self.args.bsz,
                                                 desc='test', support_rule=self.support_rule,
                                                 miou_over=self.args.miou_over)
        return scores, []

    def conventions(self) -> dict:
        return {'volumetric_support': self.support_rule}

    def results(self, scores: dict) -> dict:
        return {'episodes': self.tasks, 'tasks': self.tasks, 'per_fold': scores['per_fold']}


PROTOCOLS = {'2d': EpisodeProtocol, 'volumetric': VolumetricProtocol}
