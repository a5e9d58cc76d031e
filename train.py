r"""Episodic training on a source benchmark; checkpoints are selected on a held-out source-side split.

    python train.py --method hsnet --benchmark pascal --datapath DATA --backbone resnet50 --logpath logs/hsnet
"""
import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from common.checkpoint import load_checkpoint, save_checkpoint
from common.config import parse_with_config
from common.errors import UserError, run_cli
from common.logger import RunLogger
from common.metrics import format_scores
from common.utils import configure_backends, resolve_device, rng_state, seed_everything, set_rng_state
from data import (FixedEpisodes, TrainingEpisodes, add_dataset_args, build_dataset, build_loader, dataset_class,
                  dataset_options)
from engine.factory import (add_method_args, add_plugin_args, build_model, method_options, plugin_record,
                            preparse_method, strip_plugin_keys)
from engine.loops import BOUNDARY_POLICIES, evaluate, train_epoch
from model import BACKBONES, METHODS, method_class

# Flags that may change when a run is resumed; every other value comes from the checkpoint.
RESUMABLE = ('epochs', 'workers', 'device', 'log_every', 'resume', 'config')


def build_parser(method: str = 'hsnet') -> argparse.ArgumentParser:
    r"""train.py's flags; those of `method`'s own options are added (`train.py --method patnet -h` lists them)."""
    p = argparse.ArgumentParser(description='Train a few-shot segmentation method on a source benchmark.')
    p.add_argument('--config', type=str, default=None, help='YAML file whose keys set the defaults of these flags')
    p.add_argument('--method', type=str, default='hsnet', choices=sorted(METHODS))
    p.add_argument('--benchmark', type=str, default='pascal', help='source benchmark: pascal | coco | synthetic')
    p.add_argument('--val-benchmark', type=str, default=None,
                   help='source-side benchmark for model selection (default: the val split of --benchmark)')
    p.add_argument('--datapath', type=str, default='datasets', help='folder holding the benchmarks')
    add_dataset_args(p)
    p.add_argument('--backbone', type=str, default=None, choices=BACKBONES,
                   help="default: the method's (resnet50 for hsnet and patnet)")
    p.add_argument('--backbone-weights', type=str, default='imagenet', help='imagenet | none | PATH to a .pth file')
    p.add_argument('--bn-calibration', type=int, default=0,
                   help='re-estimate the frozen backbone\'s BatchNorm statistics on this many source training images '
                        'before training (0 = off). Makes --backbone-weights none usable (see README, demo)')
    p.add_argument('--img-size', type=int, default=400)
    p.add_argument('--bsz', type=int, default=20)
    p.add_argument('--lr', type=float, default=None,
                   help="base learning rate of the method's recipe (default: the method's, 1e-3 for hsnet and "
                        "patnet; optimizer, schedule and parameter groups come from the method)")
    p.add_argument('--epochs', type=int, default=50)
    p.add_argument('--episodes-per-epoch', type=int, default=None,
                   help='training episodes per epoch (default: one per (image, class) pair of the training split)')
    p.add_argument('--val-episodes', type=int, default=1000, help='fixed, seeded validation episodes')
    p.add_argument('--nshot', type=int, default=1)
    p.add_argument('--train-boundary', type=str, default='background', choices=BOUNDARY_POLICIES,
                   help='label-255 pixels of the training query masks (PASCAL\'s object boundaries): background '
                        '(default; HSNet/PATNet train them as background) or ignore (left out of the loss); '
                        'evaluation always ignores them')
    p.add_argument('--workers', type=int, default=4)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--logpath', type=str, default=None, help='run folder (default: logs/<method>-<benchmark>-<time>)')
    p.add_argument('--resume', action='store_true', help='continue the run in --logpath from its last.pt')
    p.add_argument('--device', type=str, default='auto', help='auto | cpu | cuda | cuda:N')
    p.add_argument('--log-every', type=int, default=50, help='training steps between loss scalars')
    if method in METHODS:
        add_method_args(p, method)
    add_plugin_args(p, 'train')
    return p


def _check_source(name: str, role: str) -> None:
    if dataset_class(name).domain != 'source':
        raise UserError(f'{name!r} is a target-domain benchmark and cannot be used for {role}; target data never '
                        'touches training or checkpoint selection (evaluate it with test.py)')


def _resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[dict, dict | None]:
    logpath = Path(args.logpath) if args.logpath else None
    option_names = [f.name for f in dataclasses.fields(method_class(args.method).Options)]
    if args.resume:
        if logpath is None:
            raise UserError('--resume needs the --logpath of the run to continue')
        ckpt = load_checkpoint(logpath / 'last.pt')
        config = dict(ckpt['config'])
        config.setdefault('method_options', {})
        changed = [k for k in option_names if getattr(args, k) is not None
                   and getattr(args, k) != config['method_options'].get(k)]
        if changed:
            raise UserError(f'--resume continues the saved configuration; these method options differ from it: '
                            f'{", ".join("--" + k.replace("_", "-") for k in changed)} (start a new --logpath instead)')
        for key in RESUMABLE:               # taken from the command line only where given there
            if getattr(args, key) != parser.get_default(key) or key not in config:
                config[key] = getattr(args, key)
        config['logpath'] = str(logpath)
        ignored = [k for k, v in vars(args).items()
                   if k not in RESUMABLE and k != 'logpath' and k not in option_names
                   and v != parser.get_default(k) and v != config.get(k)]
        if ignored:
            raise UserError(f'--resume continues the saved configuration; these flags differ from it: '
                            f'{", ".join("--" + k.replace("_", "-") for k in ignored)} (start a new --logpath instead)')
        return config, ckpt
    if logpath is None:
        logpath = Path('logs') / f'{args.method}-{args.benchmark}-{time.strftime("%Y%m%d-%H%M%S")}'
    if (logpath / 'last.pt').exists():
        raise UserError(f'{logpath} already holds a run (last.pt); pass --resume to continue it or choose another '
                        '--logpath')
    config = {k: v for k, v in vars(args).items() if k not in option_names}
    config['method_options'] = method_options(args.method, {k: getattr(args, k) for k in option_names})
    config['backbone'] = args.backbone or method_class(args.method).default_backbone
    config['logpath'] = str(logpath)
    return strip_plugin_keys(config), None


def _calibrate(model, dataset, config: dict, device: torch.device) -> None:
    r"""BN statistics from `bn_calibration` source training images chosen by the seed (no target data)."""
    rng = np.random.default_rng(config['seed'])
    keys = sorted({key for key, _ in dataset.pairs})
    keys = [keys[i] for i in rng.permutation(len(keys))[:config['bn_calibration']]]
    batches = (torch.stack([dataset.transform_image(dataset.read_image(k)) for k in keys[i:i + 16]]).to(device)
               for i in range(0, len(keys), 16))
    model.backbone.calibrate_bn(batches)


def main(argv=None) -> dict:
    parser = build_parser(preparse_method(argv))
    args = parse_with_config(parser, argv)
    config, ckpt = _resolve_config(args, parser)
    for key in ('bsz', 'epochs', 'nshot', 'img_size', 'val_episodes'):
        if config[key] is not None and config[key] < 1:
            raise UserError(f'--{key.replace("_", "-")} must be >= 1')
    if config['lr'] is not None and not config['lr'] > 0:
        raise UserError(f'--lr must be > 0, got {config["lr"]}')
    val_benchmark = config['val_benchmark'] or config['benchmark']
    _check_source(config['benchmark'], 'training')
    _check_source(val_benchmark, 'model selection')

    device = resolve_device(config['device'])
    configure_backends(device)
    seed_everything(config['seed'])
    options = dataset_options(argparse.Namespace(**config))
    train_set = build_dataset(config['benchmark'], config['datapath'], 'trn', config['nshot'], config['img_size'],
                              **options)
    val_options = options if val_benchmark == config['benchmark'] else {}
    val_set = build_dataset(val_benchmark, config['datapath'], 'val', config['nshot'], config['img_size'],
                            **val_options)

    model = build_model(config, None if ckpt else config['backbone_weights']).to(device)
    n_train = config['episodes_per_epoch'] or len(train_set.pairs)
    steps_per_epoch = -(-n_train // config['bsz'])
    recipe = model.configure_optimizers(lr=config['lr'], total_steps=config['epochs'] * steps_per_epoch)
    start_epoch, best = 0, {'miou': -1.0, 'epoch': -1}
    if ckpt is None and config['bn_calibration'] > 0:
        _calibrate(model, train_set, config, device)
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
        recipe.optimizer.load_state_dict(ckpt['optimizer'])
        if recipe.scheduler is not None and ckpt.get('scheduler') is not None:
            recipe.scheduler.load_state_dict(ckpt['scheduler'])
        start_epoch, best = ckpt['epoch'] + 1, ckpt['best']
        set_rng_state(ckpt['rng'])

    log = RunLogger(config['logpath'], config)
    plugin = plugin_record(model)
    log.info(f'training {config["method"]}{" + CD-TG" if plugin else ""} '
             f'({sum(p.numel() for p in model.trainable_parameters()):,} learnable parameters) on '
             f'{train_set.describe()}')
    if plugin:
        log.info(f'CD-TG plug-in ({plugin["parameters"]:,} learnable parameters): {plugin["config"]}, text encoder '
                 f'{plugin["text_encoder"]}, reading {plugin["reading"]}')
    log.info(f'model selection on {val_set.describe()}')
    if ckpt is None and config['bn_calibration'] > 0:
        log.info(f'backbone BatchNorm statistics re-estimated on {config["bn_calibration"]} source training images')
    sampler = TrainingEpisodes(train_set, n_train, config['seed'])
    pin = device.type == 'cuda'
    train_loader = build_loader(train_set, sampler, config['bsz'], config['workers'], pin, drop_last=False)
    val_episodes = val_set.sample_episodes(config['val_episodes'], config['seed'])
    val_loader = build_loader(val_set, FixedEpisodes(val_episodes), config['bsz'], config['workers'], pin)

    def on_step(step: int, loss: torch.Tensor, terms: dict) -> None:
        if step % config['log_every'] == 0:
            # the only host sync of the training loop, every --log-every steps
            global_step = epoch * steps_per_epoch + step
            log.scalar('train/loss_step', float(loss.detach()), global_step)
            if len(terms) > 1:
                for name, value in terms.items():
                    log.scalar(f'train/loss_{name}_step', float(value.detach()), global_step)

    history = []
    try:
        for epoch in range(start_epoch, config['epochs']):
            sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            model.hooks.bind(train_set.name, train_set.class_names)
            # runs started before the flag existed left 255 out of the loss
            trn = train_epoch(model, train_loader, recipe, device, train_set.class_names,
                              desc=f'epoch {epoch} train', on_step=on_step,
                              boundary=config.get('train_boundary', 'ignore'))
            model.hooks.bind(val_set.name, val_set.class_names)
            val, _ = evaluate(model, val_loader, device, val_set.class_names, desc=f'epoch {epoch} val')
            improved = val['miou'] > best['miou']
            if improved:
                best = {'miou': val['miou'], 'fbiou': val['fbiou'], 'dice': val['dice'], 'epoch': epoch}
            log.info(f'epoch {epoch:3d} | train loss {trn["loss"]:.4f} mIoU {trn["miou"]:5.2f} | val loss '
                     f'{val["loss"]:.4f} {format_scores(val)} | {time.perf_counter() - t0:.1f}s'
                     f'{" | best" if improved else ""}')
            for tag, scores in (('train', trn), ('val', val)):
                for key in ('loss', 'miou', 'fbiou', 'dice'):
                    log.scalar(f'{tag}/{key}', scores[key], epoch)
            for name, value in trn.get('loss_terms', {}).items():
                log.scalar(f'train/loss_{name}', value, epoch)
            history.append({'epoch': epoch, 'train': trn, 'val': val})
            state = {'model': model.state_dict(), 'method': config['method'], 'backbone': config['backbone'],
                     'config': config, 'epoch': epoch, 'optimizer': recipe.optimizer.state_dict(),
                     'scheduler': recipe.scheduler.state_dict() if recipe.scheduler is not None else None,
                     'rng': rng_state(),
                     'best': best, 'val': val, 'class_names': train_set.class_names,
                     'plugin': plugin_record(model)}     # after bind: includes the descriptions used
            if improved:
                save_checkpoint(state, Path(config['logpath']) / 'best.pt')
            save_checkpoint(state, Path(config['logpath']) / 'last.pt')
        log.info(f'best val mIoU {best["miou"]:.2f} at epoch {best["epoch"]} -> {config["logpath"]}/best.pt')
    finally:
        log.close()
    return {'best': best, 'history': history, 'logpath': config['logpath']}


if __name__ == '__main__':
    run_cli(main)
