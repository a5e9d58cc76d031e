r"""Evaluate a checkpoint on a benchmark with a fixed, seeded episode list.

    python test.py --load logs/hsnet/best.pt --benchmark isic --datapath DATA --nshot 1

Prints `mIoU: xx.xx  FB-IoU: xx.xx  Dice: xx.xx` and writes results.json (scores, per-class IoU, seed and the
episode list) into --logpath.
"""
import argparse
import time
import warnings
from pathlib import Path

from common.config import parse_with_config
from common.errors import UserError, run_cli
from common.logger import RunLogger
from common.metrics import MIOU_OVER, format_scores
from common.utils import configure_backends, resolve_device, seed_everything
from data import add_dataset_args, build_dataset, dataset_class, dataset_options
from engine.factory import add_plugin_args, load_model, plugin_record
from engine.figures import save_episode_figure
from engine.protocols import PROTOCOLS
from engine.volumetric import SUPPORT_RULES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Test a trained few-shot segmenter on a benchmark.')
    p.add_argument('--config', type=str, default=None, help='YAML file whose keys set the defaults of these flags')
    p.add_argument('--load', type=str, required=False, default=None, help='checkpoint (best.pt / last.pt)')
    p.add_argument('--benchmark', type=str, default='synthetic-med')
    p.add_argument('--datapath', type=str, default='datasets')
    add_dataset_args(p)
    p.add_argument('--nshot', type=int, default=1)
    p.add_argument('--protocol', type=str, default='2d', choices=tuple(PROTOCOLS),
                   help='2d: pre-sampled 2D episodes (every benchmark); volumetric: Q-Net\'s 5-fold protocol with '
                        '3D Dice per organ (chaos; see engine/volumetric.py)')
    p.add_argument('--volumetric-support', type=str, default=None, choices=SUPPORT_RULES,
                   help='support volume of each fold in the volumetric protocol: qnet (default; Q-Net\'s supp_idx 2) '
                        'or ssl-alpnet (the fold\'s extra fifth scan, SSL-ALPNet\'s SUPP_ID [4])')
    p.add_argument('--episodes', type=int, default=None,
                   help='number of pre-sampled test episodes (2d protocol; default 600, or what the benchmark\'s '
                        'protocol fixes)')
    p.add_argument('--miou-over', type=str, default='all', choices=MIOU_OVER,
                   help='all (default, as HSNet/PATNet): mIoU and Dice average over every class of the split, a class '
                        'without episodes counting 0; seen: over the classes that had episodes')
    p.add_argument('--seed', type=int, default=0, help='seeds the episode list (saved with the results)')
    p.add_argument('--img-size', type=int, default=None, help='default: the training image size')
    p.add_argument('--bsz', type=int, default=1, help='episodes per forward pass')
    p.add_argument('--workers', type=int, default=4)
    p.add_argument('--logpath', type=str, default=None,
                   help='output folder (default: <checkpoint folder>/test-<benchmark>-<K>shot-seed<seed>)')
    p.add_argument('--device', type=str, default='auto', help='auto | cpu | cuda | cuda:N')
    p.add_argument('--vis', type=int, default=0, help='draw the first N episodes into predictions.png')
    p.add_argument('--finetune-steps', type=int, default=None,
                   help='test-time adaptation steps per episode, for methods that have it (default: the method\'s; '
                        'reset after every episode)')
    p.add_argument('--finetune-lr', type=float, default=None,
                   help='learning rate of test-time adaptation (default: the method\'s)')
    p.add_argument('--tf32', action='store_true',
                   help='allow TF32 matmuls/convolutions on CUDA (faster; ~1e-3 relative error in the correlations). '
                        'Off by default, so evaluation matches float32 reference code')
    add_plugin_args(p, 'test')
    return p


def main(argv=None) -> dict:
    args = parse_with_config(build_parser(), argv)
    if not args.load:
        raise UserError('--load CHECKPOINT is required (a best.pt or last.pt written by train.py)')
    for key in ('nshot', 'episodes', 'bsz'):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise UserError(f'--{key} must be >= 1')
    cls = dataset_class(args.benchmark)
    split = 'test' if 'test' in cls.splits else 'val'
    PROTOCOLS[args.protocol].check(cls, args)
    device = resolve_device(args.device)
    configure_backends(device, tf32=args.tf32)
    model, ckpt = load_model(args.load, device, args)
    model.set_test_time(finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr)
    train_config = ckpt['config']
    dataset = build_dataset(args.benchmark, args.datapath, split, args.nshot, args.img_size or train_config['img_size'],
                            **dataset_options(args))
    img_size = dataset.img_size                      # a benchmark protocol may fix it (--wbc-protocol cdtg: 321)
    model.hooks.bind(dataset.name, dataset.class_names)

    seed_everything(args.seed)
    protocol = PROTOCOLS[args.protocol](dataset, args, device)
    logpath = Path(args.logpath or
                   Path(args.load).parent / f'test-{args.benchmark}{protocol.tag}-{args.nshot}shot-seed{args.seed}')
    log = RunLogger(logpath, vars(args), tensorboard=False)
    try:
        adaptation = (f', test-time adaptation {model.adaptation.steps} steps at lr {model.adaptation.lr:g}'
                      if model.adaptation.steps else '')
        log.info(f'{train_config["method"]} ({train_config["backbone"]}) from {args.load} on {dataset.describe()}, '
                 f'{args.nshot}-shot, {protocol.unit}, seed {args.seed}, {img_size}x{img_size}{adaptation}')
        start = time.perf_counter()
        scores, kept = protocol.run(model)
        missing = scores['classes_without_episodes']
        if missing:
            effect = ('they count 0 in mIoU and Dice (--miou-over all, as HSNet/PATNet)' if args.miou_over == 'all'
                      else 'they are left out of mIoU and Dice (--miou-over seen)')
            message = f'{len(missing)} class(es) of {args.benchmark} had no episode ({", ".join(missing)}): {effect}'
            warnings.warn(message, UserWarning, stacklevel=1)
            log.info(f'warning: {message}')
        plugin = plugin_record(model)
        # every comparability choice behind the numbers (None: does not apply to this run); see README,
        # "Comparing with published numbers"
        conventions = {
            'metric': scores['metric'], 'lung_subset': None, 'wbc_protocol': None, 'volumetric_support': None,
            'train_boundary': train_config.get('train_boundary', 'ignore'),
            'tf32': bool(args.tf32 and device.type == 'cuda'),
            'cdtg_reading': plugin['reading'] if plugin else None,
            'text_encoder': plugin['text_encoder'] if plugin else None,
        }
        conventions.update(dataset.conventions())
        conventions.update(protocol.conventions())
        results = {
            'miou': scores['miou'], 'fbiou': scores['fbiou'], 'dice': scores['dice'],
            'per_class': scores['per_class'], 'per_class_dice': scores['per_class_dice'],
            'episodes_per_class': scores['episodes_per_class'],
            'classes_without_episodes': missing, 'conventions': conventions,
            'nshot': args.nshot, 'seed': args.seed, 'benchmark': args.benchmark, 'split': split,
            'img_size': img_size, 'checkpoint': str(args.load), 'method': train_config['method'],
            'method_options': train_config['method_options'], 'backbone': train_config['backbone'],
            'trained_on': train_config['benchmark'], 'seconds': time.perf_counter() - start,
            'test_time_adaptation': {'steps': model.adaptation.steps, 'lr': model.adaptation.lr},
            'protocol': args.protocol, 'plugin': plugin,
            'dataset_options': {k: v for k, v in dataset_options(args).items() if v is not None},
        }
        results.update(protocol.results(scores))
        if getattr(dataset, 'skipped', None):
            results['skipped_items'] = dataset.skipped
        log.write_json('results.json', results)
        if kept:
            fig = save_episode_figure(kept, dataset.class_names, logpath / 'predictions.png',
                                      title=f'{train_config["method"]} on {args.benchmark}, {args.nshot}-shot')
            log.info(f'figure: {fig}')
        log.info('per class IoU: ' + ', '.join(f'{k} {v:.2f}' for k, v in scores['per_class'].items()))
        if args.protocol == 'volumetric':
            log.info('per organ 3D Dice: ' + ', '.join(f'{k} {v:.2f}' for k, v in scores['per_class_dice'].items()))
        log.info(f'results: {logpath / "results.json"}')
        log.info(format_scores(scores))
    finally:
        log.close()
    return results


if __name__ == '__main__':
    run_cli(main)
