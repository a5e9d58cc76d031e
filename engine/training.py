r"""The training run behind train.py (which parses the flags without importing torch): the configuration, new or
resumed; source data with source-side validation; the model, its recipe and the recipe flags; the epoch loop with
checkpoints (last.pt every epoch and every --save-every-steps, best.pt on validation mIoU), distributed when started
under torchrun."""
import argparse
import dataclasses
import inspect
import time
from pathlib import Path

import numpy as np
import torch

from common.checkpoint import NonFiniteError, load_checkpoint, remove_stale_temp_files, save_checkpoint
from common.dist import init_distributed, shutdown
from common.errors import FlagError, UserError, launcher_rank
from common.logger import NullLogger, RunLogger
from common.metrics import format_scores
from common.paths import check_apart_from_inputs, check_creatable_folder
from common.runlock import check_free
from common.utils import configure_backends, resolve_device, rng_state, seed_everything, set_rng_state
from data import FixedEpisodes, TrainingEpisodes, build_dataset, build_loader, dataset_class, dataset_options
from data.augment import AUGMENTATIONS
from engine.factory import build_model, checkpoint_model_state, method_options, plugin_record, strip_plugin_keys
from engine.figures import episode_figure, figure_array
from engine.health import HealthLog
from engine.loops import NonFiniteGuard, evaluate, override_recipe, train_epoch
from model import method_class, stored_options, train_recipe

# The frozen BatchNorm statistics are identical on every process: no buffer synchronisation in the forward.
NO_BUFFER_SYNC = ({'forward_sync_buffers': False}
                  if 'forward_sync_buffers' in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
                  else {'broadcast_buffers': False})
# Flags that may change when a run is resumed; every other value comes from the checkpoint.
RESUMABLE = ('epochs', 'workers', 'device', 'log_every', 'save_every_steps', 'skip_nonfinite', 'compile', 'tb_images')


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, typed: set[str]) -> dict:
    r"""train.py after parsing: `args` its flags, `typed` the ones the user gave (a resumed run may change only
    those in RESUMABLE). Returns the best validation scores, the history and the run folder."""
    config, ckpt = _resolve_config(args, parser, typed)
    check_apart_from_inputs(config['logpath'], '--logpath', [('--datapath', config['datapath'])])
    val_benchmark = config['val_benchmark'] or config['benchmark']
    _check_source(config['benchmark'], 'training')
    _check_source(val_benchmark, 'model selection')
    dist, device_name = init_distributed(config['device'])
    try:
        if config['bsz'] % dist.world:
            raise FlagError(f'--bsz {config["bsz"]} is the global batch: it must be a multiple of the {dist.world} '
                            'processes')
        # the run folder, locked for this run, before any data or model is built
        log = RunLogger(config['logpath'], config) if dist.main else NullLogger()
        stale = remove_stale_temp_files(log.dir) if dist.main else []
        try:
            return _train(config, ckpt, val_benchmark, log, stale, dist, device_name)
        except NonFiniteError as err:
            log.info(f'error: {err}')
            raise
        finally:
            log.close()
    finally:
        shutdown(dist)


def _check_source(name: str, role: str) -> None:
    if dataset_class(name).domain != 'source':
        raise UserError(f'{name!r} is a target-domain benchmark and cannot be used for {role}; target data never '
                        'touches training or checkpoint selection (evaluate it with test.py)')


def _resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser,
                    typed: set[str]) -> tuple[dict, dict | None]:
    logpath = Path(args.logpath) if args.logpath else None
    if logpath is not None:
        check_creatable_folder(logpath, '--logpath')
        if launcher_rank() == 0:
            check_free(logpath)                 # a live run there: say so before anything reads its files
    option_names = [f.name for f in dataclasses.fields(method_class(args.method).Options)]
    if args.resume:
        if logpath is None:
            raise UserError('--resume needs the --logpath of the run to continue')
        if not (logpath / 'last.pt').exists():
            raise UserError(f'--resume: {logpath} holds no last.pt, so there is nothing to continue (start the run '
                            'without --resume)')
        ckpt = load_checkpoint(logpath / 'last.pt', require_finite=True)
        config = dict(ckpt['config'])
        config['method_options'] = stored_options(config['method'], config.get('method_options'))
        for key in RESUMABLE:
            config.setdefault(key, parser.get_default(key))
        differ = []
        for key in sorted(typed - {'resume', 'logpath'}):       # only what the user gave, never parser defaults
            value = getattr(args, key)
            if key in option_names:
                if value != config['method_options'].get(key):
                    differ.append(key)
            elif key in RESUMABLE:
                config[key] = value
            elif value != config.get(key):
                differ.append(key)
        if differ:
            raise UserError(f'--resume continues the saved configuration; these flags differ from it: '
                            f'{", ".join("--" + k.replace("_", "-") for k in differ)} (only '
                            f'{", ".join("--" + k.replace("_", "-") for k in RESUMABLE)} may change; start a new '
                            '--logpath for anything else)')
        config['logpath'] = str(logpath)
        return config, ckpt
    if logpath is None:
        logpath = Path('logs') / f'{args.method}-{args.benchmark}-{time.strftime("%Y%m%d-%H%M%S")}'
    if (logpath / 'last.pt').exists():
        raise UserError(f'{logpath} already holds a run (last.pt); pass --resume to continue it or choose another '
                        '--logpath')
    config = {k: v for k, v in vars(args).items() if k not in option_names and k != 'resume'}
    recipe = train_recipe(args.method, args.nshot)
    config['recipe_from_method'] = sorted(k for k in recipe if config.get(k) is None)
    config.update({k: recipe[k] for k in config['recipe_from_method']})
    config['method_options'] = method_options(args.method, {k: getattr(args, k) for k in option_names})
    config['backbone'] = args.backbone or method_class(args.method).default_backbone
    config['logpath'] = str(logpath)
    return strip_plugin_keys(config), None


def _recipe_line(config: dict, model, recipe) -> str:
    r"""The effective training recipe in one line; '*' marks the method's own defaults (its public code's)."""
    mark = set(config.get('recipe_from_method', ()))
    lr = config['lr'] or model.default_lr
    schedule = config.get('lr_schedule', 'method')
    shown = {'img_size': f'{config["img_size"]}px', 'bsz': f'batch {config["bsz"]}',
             'epochs': f'{config["epochs"]} epochs', 'train_boundary': f'label 255 as {config["train_boundary"]}',
             'augmentation': f'augmentation {config.get("augmentation", "none")}'}
    parts = [text + ('*' if key in mark else '') for key, text in shown.items()]
    spec = model.backbone.spec
    dilated = '+'.join(f'layer{i}' for i, d in enumerate(spec.dilate, start=2) if d and i <= spec.last_layer)
    line = (f'recipe: {", ".join(parts)}, {type(recipe.optimizer).__name__} lr {lr:g} ({schedule} schedule), '
            f'backbone geometry {spec.geometry} (dilated: {dilated or "none"})')
    options = ', '.join(f'{k} {v}' for k, v in config['method_options'].items())
    if options:
        line += f'; options: {options}'
    return line + (" (* the method's default)" if mark else '')


def _calibrate(model, dataset, config: dict, device: torch.device) -> None:
    r"""BN statistics from `bn_calibration` source training images chosen by the seed (no target data)."""
    rng = np.random.default_rng(config['seed'])
    keys = sorted({key for key, _ in dataset.pairs})
    keys = [keys[i] for i in rng.permutation(len(keys))[:config['bn_calibration']]]
    batches = (torch.stack([dataset.transform_image(dataset.read_image(k)) for k in keys[i:i + 16]]).to(device)
               for i in range(0, len(keys), 16))
    model.backbone.calibrate_bn(batches)


def _train(config: dict, ckpt: dict | None, val_benchmark: str, log: RunLogger, stale: list, dist,
           device_name: str) -> dict:
    if stale:
        log.info(f'removed {len(stale)} temp file(s) left by an interrupted save: {", ".join(p.name for p in stale)}')
    if config['backbone_weights'] == 'none' and not config['bn_calibration']:
        log.info('warning: --backbone-weights none without --bn-calibration: a random backbone with default '
                 'BatchNorm statistics makes every pixel look alike, and the model will score near 0 mIoU. Pass '
                 '--bn-calibration 256 (see README, "The demo"), or use ImageNet weights')
    device = resolve_device(device_name)
    configure_backends(device)
    seed_everything(config['seed'])
    options = dataset_options(argparse.Namespace(**config))
    train_set = build_dataset(config['benchmark'], config['datapath'], 'trn', config['nshot'], config['img_size'],
                              **options)
    val_options = options if val_benchmark == config['benchmark'] else {}
    val_set = build_dataset(val_benchmark, config['datapath'], 'val', config['nshot'], config['img_size'],
                            **val_options)
    train_set.as_uint8 = val_set.as_uint8 = device.type == 'cuda'     # normalised on the GPU: 4x fewer bytes
    train_set.augmentation = AUGMENTATIONS[config.get('augmentation', 'none')]    # older runs: none

    for name, n in train_set.classes_short_of_shots().items():
        log.info(f'warning: {train_set.name} class {name!r} has {n} images: its {config["nshot"]}-shot training '
                 'supports repeat')
    rebuild = ckpt is not None and ckpt.get('backbone_identity')        # a lean checkpoint: rebuild the backbone
    model = build_model(config, 'imagenet' if rebuild else None if ckpt else config['backbone_weights']).to(device)
    n_train = config['episodes_per_epoch'] or len(train_set.pairs)
    # a distributed run drops a last, incomplete global batch (every process takes the same number of steps)
    steps_per_epoch = -(-n_train // config['bsz']) if not dist.enabled else n_train // config['bsz']
    if steps_per_epoch < 1:
        raise UserError(f'{n_train} training episodes per epoch do not fill one global batch of --bsz '
                        f'{config["bsz"]}; raise --episodes-per-epoch or lower --bsz')
    if dist.enabled and n_train % config['bsz']:
        log.info(f'warning: {n_train % config["bsz"]} of {n_train} episodes per epoch do not fill a global batch '
                 f'of {config["bsz"]} and are dropped in this {dist.world}-process run')
    recipe = model.configure_optimizers(lr=config['lr'], total_steps=config['epochs'] * steps_per_epoch)
    recipe = override_recipe(recipe, config.get('lr_schedule', 'method'), config['epochs'] * steps_per_epoch,
                             config.get('warmup_steps', 0), config.get('grad_clip'))
    precision = config.get('precision', 'fp32')
    scaler = torch.amp.GradScaler(device.type) if precision == 'fp16' else None
    start_epoch, start_step, best, last_val = 0, 0, {'miou': -1.0, 'epoch': -1}, None
    if ckpt is None and config['bn_calibration'] > 0:
        _calibrate(model, train_set, config, device)
    if ckpt is not None:
        if rebuild:
            _, identity = checkpoint_model_state(model, config)
            if identity != ckpt['backbone_identity']:
                raise UserError(f'{logpath_of(config)}/last.pt stores its frozen backbone by identity, but the '
                                'ImageNet weights on this machine differ from the ones it was trained with')
        result = model.load_state_dict(ckpt['model'], strict=not rebuild)
        if rebuild and result.unexpected_keys:
            raise UserError(f'{logpath_of(config)}/last.pt does not fit this model: {result.unexpected_keys[:3]}')
        try:
            recipe.optimizer.load_state_dict(ckpt['optimizer'])
        except ValueError as err:                       # groups of another count or size
            raise UserError(f'{logpath_of(config)}/last.pt holds optimizer state that does not fit the optimizer '
                            f'groups this version builds ({err}); it was written by an older version (before '
                            'CD-TG had its own optimiser group?) and cannot be resumed: start a new --logpath') from err
        if recipe.scheduler is not None and ckpt.get('scheduler') is not None:
            recipe.scheduler.load_state_dict(ckpt['scheduler'])
        if scaler is not None and ckpt.get('scaler') is not None:
            scaler.load_state_dict(ckpt['scaler'])
        start_epoch, start_step = ckpt.get('next', (ckpt['epoch'] + 1, 0))
        best, last_val = ckpt['best'], ckpt.get('val')
        set_rng_state(ckpt['rng'])
        log.info(f'resumed from epoch {start_epoch}' + (f', step {start_step}' if start_step else '') +
                 f' of {logpath_of(config)}/last.pt')

    plugin = plugin_record(model)
    log.info(f'training {config["method"]}{" + CD-TG" if plugin else ""} '
             f'({sum(p.numel() for p in model.trainable_parameters()):,} learnable parameters) on '
             f'{train_set.describe()}')
    if plugin:
        log.info(f'CD-TG plug-in ({plugin["parameters"]:,} learnable parameters): {plugin["config"]}, text encoder '
                 f'{plugin["text_encoder"]}, reading {plugin["reading"]}, optimiser group {plugin["optimizer"]}')
    log.info(_recipe_line(config, model, recipe))
    log.info(f'model selection on {val_set.describe()}')
    if ckpt is None and config['bn_calibration'] > 0:
        log.info(f'backbone BatchNorm statistics re-estimated on {config["bn_calibration"]} source training images')
    sampler = TrainingEpisodes(train_set, n_train, config['seed']).shard(dist.rank, dist.world, config['bsz'])
    pin = device.type == 'cuda'
    local_bsz = config['bsz'] // dist.world
    train_loader = build_loader(train_set, sampler, local_bsz, config['workers'], pin, drop_last=False)
    val_episodes = val_set.sample_episodes(config['val_episodes'], config['seed'])
    val_loader = build_loader(val_set, FixedEpisodes(dist.shard(val_episodes)), local_bsz, config['workers'], pin)
    guard = NonFiniteGuard(config['skip_nonfinite'], Path(config['logpath']) / 'last.pt')
    forward = model
    if dist.enabled:
        # gradients of the learnable parameters are averaged over the processes; the frozen backbone has none. A
        # backbone whose BatchNorm statistics move in training (PMMs' and Q-Net's reference BN modes) gets DDP's
        # buffer broadcast: every process runs with rank 0's running statistics, which its checkpoints save.
        sync = {} if model.backbone.moving_buffers() else NO_BUFFER_SYNC
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None, **sync)
        log.info(f'{dist.world} processes (torchrun), global batch {config["bsz"]} = {dist.world} x {local_bsz}')
    if config.get('compile'):
        model.match = torch.compile(model.match)

    def checkpoint(epoch: int, next_step: tuple[int, int], val: dict | None, resumable: bool = True) -> dict:
        r"""What inference needs (best.pt), plus what resuming needs (last.pt: optimizer, schedule, RNG)."""
        weights, identity = checkpoint_model_state(model, config)
        state = {'model': weights, 'backbone_identity': identity, 'method': config['method'],
                 'backbone': config['backbone'], 'config': config, 'epoch': epoch, 'next': next_step, 'best': best,
                 'val': val, 'class_names': train_set.class_names, 'plugin': plugin, 'world_size': dist.world}
        if resumable:
            state.update(optimizer=recipe.optimizer.state_dict(), rng=rng_state(),
                         scheduler=recipe.scheduler.state_dict() if recipe.scheduler is not None else None,
                         scaler=scaler.state_dict() if scaler is not None else None)
        return state

    def on_step(step: int, loss: torch.Tensor, terms: dict) -> None:
        if step % config['log_every'] == 0:
            # a host sync every --log-every steps (besides the non-finite guard's); the mean over the processes
            global_step = epoch * steps_per_epoch + step
            values = dist.all_reduce(torch.stack([loss.detach().float()] + [v.detach().float()
                                                                             for v in terms.values()])) / dist.world
            log.scalar('train/loss_step', float(values[0]), global_step)
            if len(terms) > 1:
                for name, value in zip(terms, values[1:].tolist()):
                    log.scalar(f'train/loss_{name}_step', value, global_step)
        every = config['save_every_steps']
        if every and (step + 1) % every == 0 and step + 1 < steps_per_epoch and dist.main:
            save_checkpoint(checkpoint(epoch, (epoch, step + 1), last_val), logpath_of(config) / 'last.pt')

    health = HealthLog(log, model.hooks, logpath_of(config) if dist.main else None)

    def on_probe(step: int, readings: dict) -> None:
        health.record(epoch * steps_per_epoch + step, epoch, readings)

    history = []
    for epoch in range(start_epoch, config['epochs']):
        first = start_step if epoch == start_epoch else 0
        sampler.set_epoch(epoch, first * config['bsz'])
        t0 = time.perf_counter()
        model.hooks.bind(train_set.name, train_set.class_names)
        trn = train_epoch(model, train_loader, recipe, device, train_set.class_names, desc=f'epoch {epoch} train',
                          on_step=on_step, seed=config['seed'], epoch=epoch, start_step=first, guard=guard,
                          forward=forward, dist=dist, precision=precision, scaler=scaler,
                          boundary=config.get('train_boundary', 'ignore'),   # older runs left 255 out of the loss
                          probe_every=config['log_every'] if dist.main else 0, on_probe=on_probe)
        model.hooks.bind(val_set.name, val_set.class_names)
        val, kept = evaluate(model, val_loader, device, val_set.class_names, desc=f'epoch {epoch} val', dist=dist,
                             precision=precision, keep_predictions=config.get('tb_images', 0))
        if kept:                                # the same first N validation episodes every epoch (rank 0's)
            log.image('val/episodes', lambda: figure_array(episode_figure(kept, val_set.class_names)), epoch)
        last_val = val
        improved = val['miou'] > best['miou']
        if improved:
            best = {'miou': val['miou'], 'fbiou': val['fbiou'], 'dice': val['dice'], 'epoch': epoch}
        part = f' (steps {first}-{steps_per_epoch - 1} after resuming)' if first else ''
        train_loss = 'n/a' if trn['loss'] is None else f'{trn["loss"]:.4f}'
        log.info(f'epoch {epoch:3d} | train loss {train_loss} mIoU {trn["miou"]:5.2f}{part} | val loss '
                 f'{val["loss"]:.4f} {format_scores(val)} | {time.perf_counter() - t0:.1f}s'
                 f'{" | best" if improved else ""}')
        for tag, scores in (('train', trn), ('val', val)):
            for key in ('loss', 'miou', 'fbiou', 'dice'):
                if scores[key] is not None:
                    log.scalar(f'{tag}/{key}', scores[key], epoch)
        for name, value in trn.get('loss_terms', {}).items():
            log.scalar(f'train/loss_{name}', value, epoch)
        history.append({'epoch': epoch, 'train': trn, 'val': val})
        if dist.main:
            if improved:
                save_checkpoint(checkpoint(epoch, (epoch + 1, 0), val, resumable=False), logpath_of(config) / 'best.pt')
            save_checkpoint(checkpoint(epoch, (epoch + 1, 0), val), logpath_of(config) / 'last.pt')
        dist.barrier()                              # nobody reads last.pt before it is complete
    log.hparams(hparam_summary(config, plugin, recipe),
                {'hparam/best_val_miou': best['miou'], 'hparam/best_val_fbiou': best.get('fbiou', float('nan')),
                 'hparam/best_val_dice': best.get('dice', float('nan')), 'hparam/best_epoch': best['epoch']})
    log.info(f'best val mIoU {best["miou"]:.2f} at epoch {best["epoch"]} -> {config["logpath"]}/best.pt')
    return {'best': best, 'history': history, 'logpath': config['logpath']}


def hparam_summary(config: dict, plugin: dict | None, recipe) -> dict:
    r"""The settings that tell runs apart, flat, for TensorBoard's HParams tab."""
    keys = ('method', 'benchmark', 'backbone', 'backbone_weights', 'bn_calibration', 'img_size', 'bsz', 'epochs',
            'episodes_per_epoch', 'nshot', 'seed')
    out = {k: config.get(k) for k in keys}
    out['lr'] = recipe.optimizer.param_groups[0]['lr']          # the method's default when --lr was not given
    out.update({f'option/{k}': v for k, v in config['method_options'].items()})
    out['cdtg'] = plugin is not None
    if plugin is not None:
        out.update({f'cdtg/{k}': v for k, v in plugin['config'].items() if k not in ('text_cache', 'seed')})
    return {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in out.items()}


def logpath_of(config: dict) -> Path:
    return Path(config['logpath'])

