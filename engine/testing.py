r"""The evaluation behind test.py (which parses the flags without importing torch): the checkpoint's model with
its plug-in and test-time settings, the benchmark's fixed episode list or the volumetric protocol, distributed
when started under torchrun, and results.json with every convention behind the numbers."""
import argparse
import time
import warnings
from pathlib import Path

import torch

from common.errors import UserError
from common.dist import init_distributed, shutdown
from common.logger import NullLogger, RunLogger
from common.metrics import format_scores
from common.paths import check_apart_from_inputs, check_creatable_folder
from common.utils import configure_backends, resolve_device, seed_everything
from data import build_dataset, dataset_class, dataset_options
from engine.config import TrainConfig
from engine.factory import adaptation_record, load_model, plugin_record
from engine.figures import save_episode_figure
from engine.loops import Runtime
from engine.protocols import PROTOCOLS


def run(args: argparse.Namespace) -> dict:
    r"""test.py after parsing: evaluate the checkpoint `args.load` under the chosen protocol; returns what
    results.json holds."""
    if not args.load:
        raise UserError('--load CHECKPOINT is required (a best.pt or last.pt written by train.py)')
    if Path(args.load).is_dir():
        found = [str(Path(args.load) / n) for n in ('best.pt', 'last.pt') if (Path(args.load) / n).exists()]
        raise UserError(f'--load {args.load} is a run folder; pass {" or ".join(found) or args.load + "/best.pt"}')
    cls = dataset_class(args.benchmark)
    split = 'test' if 'test' in cls.splits else 'val'
    PROTOCOLS[args.protocol].check(cls, args)
    dist, device_name = init_distributed(args.device)
    try:
        return _test(args, split, dist, device_name)
    finally:
        shutdown(dist)


def _test(args, split: str, dist, device_name: str) -> dict:
    device = resolve_device(device_name)
    configure_backends(device, tf32=args.tf32)
    logpath = Path(args.logpath or Path(args.load).parent /
                   f'test-{args.benchmark}{PROTOCOLS[args.protocol].tag}-{args.nshot}shot-seed{args.seed}')
    check_creatable_folder(logpath, '--logpath')
    check_apart_from_inputs(logpath, '--logpath', [('--load', args.load), ('--datapath', args.datapath)])
    log = NullLogger()
    if dist.main:
        try:                                    # the run folder, locked for this run, before any data or model
            log = RunLogger(logpath, vars(args), tensorboard=False)
        except UserError as err:
            if args.logpath:
                raise
            raise UserError(f'{err} (the default output folder is next to the checkpoint)') from err
    try:
        runtime = Runtime(device, dist, args.precision)
        model, ckpt, trained = _load(args, device, log)
        dataset = build_dataset(args.benchmark, args.datapath, split, args.nshot,
                                args.img_size or trained.data.img_size, **dataset_options(args))
        dataset.as_uint8 = device.type == 'cuda'                        # normalised on the GPU: 4x fewer bytes
        dataset.cache_size = args.cache_images
        model.hooks.bind(dataset.name, dataset.class_names)
        seed_everything(args.seed)
        protocol = PROTOCOLS[args.protocol](dataset, args, runtime)
        log.info(_header(args, trained, model, dataset, protocol, dist))
        start = time.perf_counter()
        scores, kept = protocol.run(model)
        _warn_missing(args, scores, log)
        results = results_record(args, trained, model, ckpt, dataset, protocol, scores, runtime)
        results['seconds'] = time.perf_counter() - start
        if dist.main:
            _report(args, results, scores, kept, trained, dataset, log, logpath)
    finally:
        log.close()
    return results


def _load(args, device: torch.device, log) -> tuple:
    r"""The checkpoint's model with test.py's plug-in overrides and test-time settings, the checkpoint, and its
    training configuration."""
    model, ckpt = load_model(args.load, device, args)
    model.set_test_time(finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr)
    model.match_shots = args.match_shots
    if args.compile:
        model.match = torch.compile(model.match)
    trained = TrainConfig.from_saved(ckpt['config'], ckpt.get('plugin'))
    if trained.backbone_weights == 'none' and not trained.bn_calibration:
        log.info(f'warning: {args.load} was trained on a random backbone without --bn-calibration; its features '
                 'barely tell pixels apart, so expect near-zero mIoU (see README, "The demo")')
    return model, ckpt, trained


def _header(args, trained: TrainConfig, model, dataset, protocol, dist) -> str:
    adaptation = (f', test-time adaptation {model.adaptation.steps} steps at lr {model.adaptation.lr:g}'
                  if model.adaptation.steps else '')
    processes = f', {dist.world} processes' if dist.enabled else ''
    size = dataset.img_size                     # a benchmark protocol may fix it (--wbc-protocol cdtg: 321)
    return (f'{trained.model.method} ({trained.model.backbone}) from {args.load} on {dataset.describe()}, '
            f'{args.nshot}-shot, {protocol.unit}, seed {args.seed}, {size}x{size}{adaptation}, {args.precision}'
            f'{processes}')


def _warn_missing(args, scores: dict, log) -> None:
    missing = scores['classes_without_episodes']
    if missing:
        effect = ('they count 0 in mIoU and Dice (--miou-over all, as HSNet/PATNet)' if args.miou_over == 'all'
                  else 'they are left out of mIoU and Dice (--miou-over seen)')
        message = f'{len(missing)} class(es) of {args.benchmark} had no episode ({", ".join(missing)}): {effect}'
        warnings.warn(message, UserWarning, stacklevel=1)
        log.info(f'warning: {message}')


def conventions_record(trained: TrainConfig, model, plugin: dict | None, tf32: bool) -> dict:
    r"""Every comparability choice behind the numbers (None: does not apply to this run); see docs/reproducing.md,
    "Comparing with published numbers". The dataset and the protocol add theirs."""
    return {
        'metric': None, 'lung_subset': None, 'wbc_protocol': None, 'volumetric_support': None,
        'train_boundary': trained.train_boundary, 'train_augmentation': trained.augmentation, 'tf32': tf32,
        'backbone_geometry': model.backbone.spec.geometry, 'backbone_dilation': list(model.backbone.spec.dilate),
        'initial_weights': trained.backbone_weights,
        'cdtg_reading': plugin['reading'] if plugin else None,
        'text_encoder': plugin['text_encoder'] if plugin else None,
    }


def results_record(args, trained: TrainConfig, model, ckpt: dict, dataset, protocol, scores: dict,
                   runtime: Runtime) -> dict:
    r"""What results.json holds: the scores, every convention behind them, and what produced them."""
    plugin = plugin_record(model)
    if plugin is not None and (ckpt.get('plugin') or {}).get('optimizer'):
        plugin['optimizer'] = ckpt['plugin']['optimizer']         # the group as training built it
    conventions = conventions_record(trained, model, plugin, bool(args.tf32 and runtime.device.type == 'cuda'))
    conventions['metric'] = scores['metric']
    conventions.update(dataset.conventions())
    conventions.update(protocol.conventions())
    results = {
        'miou': scores['miou'], 'fbiou': scores['fbiou'], 'dice': scores['dice'],
        'per_class': scores['per_class'], 'per_class_dice': scores['per_class_dice'],
        'episodes_per_class': scores['episodes_per_class'],
        'classes_without_episodes': scores['classes_without_episodes'], 'conventions': conventions,
        'nshot': args.nshot, 'seed': args.seed, 'benchmark': args.benchmark, 'split': dataset.split,
        'img_size': dataset.img_size, 'checkpoint': str(args.load), 'method': trained.model.method,
        'method_options': trained.model.method_options, 'backbone': trained.model.backbone,
        'trained_on': trained.data.benchmark, 'seconds': None,
        'test_time_adaptation': adaptation_record(model),
        'protocol': args.protocol, 'plugin': plugin,
        'dataset_options': {k: v for k, v in dataset_options(args).items() if v is not None},
        'precision': args.precision, 'tf32': args.tf32, 'world_size': runtime.dist.world,
    }
    results.update(protocol.results(scores))
    if getattr(dataset, 'skipped', None):
        results['skipped_items'] = dataset.skipped
    return results


def _report(args, results: dict, scores: dict, kept: list, trained: TrainConfig, dataset, log, logpath: Path) -> None:
    log.write_json('results.json', results)
    if kept:
        fig = save_episode_figure(kept, dataset.class_names, logpath / 'predictions.png',
                                  title=f'{trained.model.method} on {args.benchmark}, {args.nshot}-shot')
        log.info(f'figure: {fig}')
    log.info('per class IoU: ' + ', '.join(f'{k} {v:.2f}' for k, v in scores['per_class'].items()))
    if args.protocol == 'volumetric':
        log.info('per organ 3D Dice: ' + ', '.join(f'{k} {v:.2f}' for k, v in scores['per_class_dice'].items()))
    log.info(f'results: {logpath / "results.json"}')
    log.info(format_scores(scores))
