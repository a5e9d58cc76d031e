r"""The training run behind train.py (which parses the flags without importing torch), in three steps:

    config = resolve_config(args, ...)      the typed run configuration (engine/config.py), new or resumed
    run = build_run(config, ckpt, ...)      data, model, recipe, loaders, resumed state: everything `fit` reads
    fit(run)                                the epoch loop: train, validate, log, checkpoint

Checkpoints (`checkpoint_state`): last.pt every epoch and every --save-every-steps, best.pt on validation mIoU.
Source data only: model selection runs on a held-out source-side split. Distributed when started under torchrun.
"""
import argparse
import dataclasses
import functools
import inspect
import time
from pathlib import Path

import numpy as np
import torch

from common.checkpoint import NonFiniteError, load_checkpoint, remove_stale_temp_files, save_checkpoint
from common.dist import Dist, init_distributed, shutdown
from common.errors import FlagError, UserError, launcher_rank
from common.logger import NullLogger, RunLogger
from common.metrics import format_scores
from common.paths import check_apart_from_inputs, check_creatable_folder
from common.runlock import check_free
from common.utils import configure_backends, resolve_device, rng_state, seed_everything, set_rng_state
from data import FixedEpisodes, TrainingEpisodes, build_dataset, build_loader, dataset_class
from data.augment import AUGMENTATIONS
from engine.config import TrainConfig
from engine.factory import build_model, checkpoint_model_state, plugin_record
from engine.figures import episode_figure, figure_array
from engine.flags import plugin_specs
from engine.health import HealthLog
from engine.loops import EpochPlan, NonFiniteGuard, Runtime, evaluate, override_recipe, train_epoch
from model import method_class, train_recipe

# The frozen BatchNorm statistics are identical on every process: no buffer synchronisation in the forward.
NO_BUFFER_SYNC = ({'forward_sync_buffers': False}
                  if 'forward_sync_buffers' in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
                  else {'broadcast_buffers': False})
# Flags that may change when a run is resumed; every other value comes from the checkpoint.
RESUMABLE = ('epochs', 'workers', 'device', 'log_every', 'save_every_steps', 'skip_nonfinite', 'compile', 'tb_images')


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, typed: set[str]) -> dict:
    r"""train.py after parsing: `args` its flags, `typed` the ones the user gave (a resumed run may change only
    those in RESUMABLE). Returns the best validation scores, the history and the run folder."""
    config, ckpt = resolve_config(args, parser, typed)
    check_apart_from_inputs(config.logpath, '--logpath', [('--datapath', config.data.datapath)])
    _check_source(config.data.benchmark, 'training')
    _check_source(config.data.validation, 'model selection')
    dist, device_name = init_distributed(config.device)
    try:
        if config.bsz % dist.world:
            raise FlagError(f'--bsz {config.bsz} is the global batch: it must be a multiple of the {dist.world} '
                            'processes')
        # the run folder, locked for this run, before any data or model is built
        log = RunLogger(config.logpath, config.to_dict()) if dist.main else NullLogger()
        stale = remove_stale_temp_files(log.dir) if dist.main else []
        try:
            if stale:
                log.info(f'removed {len(stale)} temp file(s) left by an interrupted save: '
                         f'{", ".join(p.name for p in stale)}')
            return fit(build_run(config, ckpt, log, dist, device_name))
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


# --- the configuration --------------------------------------------------------------------------------------------
def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser,
                   typed: set[str]) -> tuple[TrainConfig, dict | None]:
    r"""The run's configuration: a new one from the flags (the method's recipe filling what they leave unset), or,
    with --resume, the saved one with the RESUMABLE flags the user typed. Returns it with the checkpoint to
    resume (None for a new run)."""
    logpath = Path(args.logpath) if args.logpath else None
    if logpath is not None:
        check_creatable_folder(logpath, '--logpath')
        if launcher_rank() == 0:
            check_free(logpath)                 # a live run there: say so before anything reads its files
    if args.resume:
        return _resumed_config(args, parser, typed, logpath)
    if logpath is None:
        logpath = Path('logs') / f'{args.method}-{args.benchmark}-{time.strftime("%Y%m%d-%H%M%S")}'
    if (logpath / 'last.pt').exists():
        raise UserError(f'{logpath} already holds a run (last.pt); pass --resume to continue it or choose another '
                        '--logpath')
    return TrainConfig.from_args(args, train_recipe(args.method, args.nshot), str(logpath)), None


def _resumed_config(args: argparse.Namespace, parser: argparse.ArgumentParser, typed: set[str],
                    logpath: Path | None) -> tuple[TrainConfig, dict]:
    if logpath is None:
        raise UserError('--resume needs the --logpath of the run to continue')
    if not (logpath / 'last.pt').exists():
        raise UserError(f'--resume: {logpath} holds no last.pt, so there is nothing to continue (start the run '
                        'without --resume)')
    ckpt = load_checkpoint(logpath / 'last.pt', require_finite=True)
    try:
        config = TrainConfig.from_saved(ckpt['config'], ckpt.get('plugin'),
                                        defaults={k: parser.get_default(k) for k in RESUMABLE}, strict=True)
    except UserError as err:
        raise UserError(f'--resume: {logpath / "last.pt"}: {err}') from err
    option_names = {f.name for f in dataclasses.fields(method_class(config.model.method).Options)}
    saved = config.to_dict(checkpoint=True)
    for spec in plugin_specs():
        saved.update(spec.to_flags(config.model.plugin(spec.name)))
    differ = []
    for key in sorted(typed - {'resume', 'logpath'}):           # only what the user gave, never parser defaults
        value = getattr(args, key)
        if key in option_names:
            if value != config.model.method_options.get(key):
                differ.append(key)
        elif key in RESUMABLE:
            setattr(config, key, value)
        elif value != saved.get(key):
            differ.append(key)
    if differ:
        raise UserError(f'--resume continues the saved configuration; these flags differ from it: '
                        f'{", ".join("--" + k.replace("_", "-") for k in differ)} (only '
                        f'{", ".join("--" + k.replace("_", "-") for k in RESUMABLE)} may change; start a new '
                        '--logpath for anything else)')
    config.logpath = str(logpath)
    return config, ckpt


# --- building the run ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainingRun:
    r"""Everything the epoch loop reads and updates."""
    config: TrainConfig
    log: RunLogger | NullLogger
    runtime: Runtime
    model: torch.nn.Module
    recipe: object
    train_set: object
    val_set: object
    steps_per_epoch: int
    plugin: dict | None = None
    forward: torch.nn.Module | None = None            # the DDP-wrapped model in a distributed run
    sampler: TrainingEpisodes | None = None
    train_loader: object = None
    val_loader: object = None
    guard: NonFiniteGuard | None = None
    health: HealthLog | None = None
    start: tuple[int, int] = (0, 0)                   # (epoch, step) the loop starts at
    best: dict = dataclasses.field(default_factory=lambda: {'miou': -1.0, 'epoch': -1})
    last_val: dict | None = None
    resumed: bool = False
    history: list = dataclasses.field(default_factory=list)

    @property
    def dist(self) -> Dist:
        return self.runtime.dist

    @property
    def folder(self) -> Path:
        return Path(self.config.logpath)


def build_run(config: TrainConfig, ckpt: dict | None, log, dist: Dist, device_name: str) -> TrainingRun:
    r"""Data, model, recipe, resumed state, loaders and the distributed wrapper of a run; nothing trains yet."""
    if config.backbone_weights == 'none' and not config.bn_calibration:
        log.info('warning: --backbone-weights none without --bn-calibration: a random backbone with default '
                 'BatchNorm statistics makes every pixel look alike, and the model will score near 0 mIoU. Pass '
                 '--bn-calibration 256 (see README, "The demo"), or use ImageNet weights')
    device = resolve_device(device_name)
    configure_backends(device)
    seed_everything(config.seed)
    train_set, val_set = _datasets(config, device, log)
    rebuild = ckpt is not None and ckpt.get('backbone_identity')        # a lean checkpoint: rebuild the backbone
    weights = 'imagenet' if rebuild else None if ckpt else config.backbone_weights
    model = build_model(config.model, weights).to(device)
    n_train = config.episodes_per_epoch or len(train_set.pairs)
    steps = _steps_per_epoch(config, n_train, dist, log)
    recipe = model.configure_optimizers(lr=config.lr, total_steps=config.epochs * steps)
    recipe = override_recipe(recipe, config.lr_schedule, config.epochs * steps, config.warmup_steps,
                             config.grad_clip)
    scaler = torch.amp.GradScaler(device.type) if config.precision == 'fp16' else None
    run = TrainingRun(config, log, Runtime(device, dist, config.precision, scaler), model, recipe, train_set,
                      val_set, steps)
    if ckpt is None and config.bn_calibration > 0:
        _calibrate(model, train_set, config.bn_calibration, config.seed, device)
    if ckpt is not None:
        _restore(run, ckpt, bool(rebuild))
    run.plugin = plugin_record(model)
    _announce(run)
    _loaders(run, n_train)
    run.guard = NonFiniteGuard(config.skip_nonfinite, run.folder / 'last.pt')
    run.health = HealthLog(log, model.hooks, run.folder if dist.main else None)
    run.forward = _distributed(model, run.runtime, config.bsz, log)
    if config.compile:
        model.match = torch.compile(model.match)
    return run


def _datasets(config: TrainConfig, device: torch.device, log) -> tuple:
    data = config.data
    train_set = build_dataset(data.benchmark, data.datapath, 'trn', data.nshot, data.img_size, **data.options)
    val_set = build_dataset(data.validation, data.datapath, 'val', data.nshot, data.img_size,
                            **data.validation_options)
    train_set.as_uint8 = val_set.as_uint8 = device.type == 'cuda'     # normalised on the GPU: 4x fewer bytes
    train_set.augmentation = AUGMENTATIONS[config.augmentation]
    for name, n in train_set.classes_short_of_shots().items():
        log.info(f'warning: {train_set.name} class {name!r} has {n} images: its {data.nshot}-shot training '
                 'supports repeat')
    return train_set, val_set


def _steps_per_epoch(config: TrainConfig, n_train: int, dist: Dist, log) -> int:
    r"""Global batches per epoch; a distributed run drops a last, incomplete global batch (every process takes the
    same number of steps)."""
    steps = -(-n_train // config.bsz) if not dist.enabled else n_train // config.bsz
    if steps < 1:
        raise UserError(f'{n_train} training episodes per epoch do not fill one global batch of --bsz '
                        f'{config.bsz}; raise --episodes-per-epoch or lower --bsz')
    if dist.enabled and n_train % config.bsz:
        log.info(f'warning: {n_train % config.bsz} of {n_train} episodes per epoch do not fill a global batch '
                 f'of {config.bsz} and are dropped in this {dist.world}-process run')
    return steps


def _calibrate(model, dataset, images: int, seed: int, device: torch.device) -> None:
    r"""BN statistics from `images` source training images chosen by the seed (no target data)."""
    rng = np.random.default_rng(seed)
    keys = sorted({key for key, _ in dataset.pairs})
    keys = [keys[i] for i in rng.permutation(len(keys))[:images]]
    batches = (torch.stack([dataset.transform_image(dataset.read_image(k)) for k in keys[i:i + 16]]).to(device)
               for i in range(0, len(keys), 16))
    model.backbone.calibrate_bn(batches)


def _restore(run: TrainingRun, ckpt: dict, rebuild: bool) -> None:
    r"""A resumed run's weights, optimiser, schedule, loss scale, position, best scores and random state."""
    model, recipe, last = run.model, run.recipe, run.folder / 'last.pt'
    if rebuild:
        _, identity = checkpoint_model_state(model, run.config)
        if identity != ckpt['backbone_identity']:
            raise UserError(f'{last} stores its frozen backbone by identity, but the ImageNet weights on this machine '
                            'differ from the ones it was trained with')
    result = model.load_state_dict(ckpt['model'], strict=not rebuild)
    if rebuild and result.unexpected_keys:
        raise UserError(f'{last} does not fit this model: {result.unexpected_keys[:3]}')
    try:
        recipe.optimizer.load_state_dict(ckpt['optimizer'])
    except ValueError as err:                       # groups of another count or size
        raise UserError(f'{last} holds optimizer state that does not fit the optimizer groups this version builds '
                        f'({err}); it was written by an older version (before CD-TG had its own optimiser group?) '
                        'and cannot be resumed: start a new --logpath') from err
    if recipe.scheduler is not None and ckpt.get('scheduler') is not None:
        recipe.scheduler.load_state_dict(ckpt['scheduler'])
    if run.runtime.scaler is not None and ckpt.get('scaler') is not None:
        run.runtime.scaler.load_state_dict(ckpt['scaler'])
    run.start = tuple(ckpt.get('next', (ckpt['epoch'] + 1, 0)))
    run.best, run.last_val, run.resumed = ckpt['best'], ckpt.get('val'), True
    set_rng_state(ckpt['rng'])
    run.log.info(f'resumed from epoch {run.start[0]}' + (f', step {run.start[1]}' if run.start[1] else '') +
                 f' of {last}')


def _announce(run: TrainingRun) -> None:
    config, log, plugin = run.config, run.log, run.plugin
    learnable = sum(p.numel() for p in run.model.trainable_parameters())
    log.info(f'training {config.model.method}{" + CD-TG" if plugin else ""} ({learnable:,} learnable parameters) '
             f'on {run.train_set.describe()}')
    if plugin:
        log.info(f'CD-TG plug-in ({plugin["parameters"]:,} learnable parameters): {plugin["config"]}, text encoder '
                 f'{plugin["text_encoder"]}, reading {plugin["reading"]}, optimiser group {plugin["optimizer"]}')
    log.info(recipe_line(config, run.model, run.recipe))
    log.info(f'model selection on {run.val_set.describe()}')
    if not run.resumed and config.bn_calibration > 0:
        log.info(f'backbone BatchNorm statistics re-estimated on {config.bn_calibration} source training images')


def recipe_line(config: TrainConfig, model, recipe) -> str:
    r"""The effective training recipe in one line; '*' marks the method's own defaults (its public code's)."""
    mark = set(config.recipe_from_method)
    lr = config.lr or model.default_lr
    shown = {'img_size': f'{config.data.img_size}px', 'bsz': f'batch {config.bsz}',
             'epochs': f'{config.epochs} epochs', 'train_boundary': f'label 255 as {config.train_boundary}',
             'augmentation': f'augmentation {config.augmentation}'}
    parts = [text + ('*' if key in mark else '') for key, text in shown.items()]
    spec = model.backbone.spec
    dilated = '+'.join(f'layer{i}' for i, d in enumerate(spec.dilate, start=2) if d and i <= spec.last_layer)
    line = (f'recipe: {", ".join(parts)}, {type(recipe.optimizer).__name__} lr {lr:g} ({config.lr_schedule} '
            f'schedule), backbone geometry {spec.geometry} (dilated: {dilated or "none"})')
    options = ', '.join(f'{k} {v}' for k, v in config.model.method_options.items())
    if options:
        line += f'; options: {options}'
    return line + (" (* the method's default)" if mark else '')


def _loaders(run: TrainingRun, n_train: int) -> None:
    r"""The training episodes (seeded, sharded over the processes) and the fixed validation episodes."""
    config, dist = run.config, run.dist
    pin = run.runtime.device.type == 'cuda'
    local_bsz = config.bsz // dist.world
    run.sampler = TrainingEpisodes(run.train_set, n_train, config.seed).shard(dist.rank, dist.world, config.bsz)
    run.train_loader = build_loader(run.train_set, run.sampler, local_bsz, config.workers, pin, drop_last=False)
    val_episodes = run.val_set.sample_episodes(config.val_episodes, config.seed)
    run.val_loader = build_loader(run.val_set, FixedEpisodes(dist.shard(val_episodes)), local_bsz, config.workers,
                                  pin)


def _distributed(model, runtime: Runtime, bsz: int, log) -> torch.nn.Module | None:
    r"""The DDP wrapper of a distributed run (None otherwise): gradients of the learnable parameters are averaged
    over the processes; the frozen backbone has none. A backbone whose BatchNorm statistics move in training (PMMs'
    and Q-Net's reference BN modes) gets DDP's buffer broadcast: every process runs with rank 0's running
    statistics, which its checkpoints save."""
    dist, device = runtime.dist, runtime.device
    if not dist.enabled:
        return None
    sync = {} if model.backbone.moving_buffers() else NO_BUFFER_SYNC
    log.info(f'{dist.world} processes (torchrun), global batch {bsz} = {dist.world} x {bsz // dist.world}')
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == 'cuda' else None, **sync)


# --- the loop -----------------------------------------------------------------------------------------------------
def fit(run: TrainingRun) -> dict:
    r"""Train from `run.start` to the last epoch: each epoch trains, validates, logs and writes last.pt (and best.pt
    when validation mIoU improved). Returns the best validation scores, the history and the run folder."""
    config, log, dist = run.config, run.log, run.dist
    for epoch in range(run.start[0], config.epochs):
        first = run.start[1] if epoch == run.start[0] else 0
        run.sampler.set_epoch(epoch, first * config.bsz)
        t0 = time.perf_counter()
        trn = _train_epoch(run, epoch, first)
        val = _validate(run, epoch)
        improved = val['miou'] > run.best['miou']
        if improved:
            run.best = {'miou': val['miou'], 'fbiou': val['fbiou'], 'dice': val['dice'], 'epoch': epoch}
        _log_epoch(run, epoch, first, trn, val, f'{time.perf_counter() - t0:.1f}s{" | best" if improved else ""}')
        run.history.append({'epoch': epoch, 'train': trn, 'val': val})
        if dist.main:
            if improved:
                save_checkpoint(checkpoint_state(run, epoch, (epoch + 1, 0), resumable=False), run.folder / 'best.pt')
            save_checkpoint(checkpoint_state(run, epoch, (epoch + 1, 0)), run.folder / 'last.pt')
        dist.barrier()                              # nobody reads last.pt before it is complete
    best = run.best
    hparams = dict(config.hparams(), lr=run.recipe.optimizer.param_groups[0]['lr'])  # the method's when --lr unset
    log.hparams({k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in hparams.items()},
                {'hparam/best_val_miou': best['miou'], 'hparam/best_val_fbiou': best.get('fbiou', float('nan')),
                 'hparam/best_val_dice': best.get('dice', float('nan')), 'hparam/best_epoch': best['epoch']})
    log.info(f'best val mIoU {best["miou"]:.2f} at epoch {best["epoch"]} -> {config.logpath}/best.pt')
    return {'best': best, 'history': run.history, 'logpath': config.logpath}


def _train_epoch(run: TrainingRun, epoch: int, first: int) -> dict:
    config, model = run.config, run.model
    model.hooks.bind(run.train_set.name, run.train_set.class_names)
    plan = EpochPlan(epoch=epoch, seed=config.seed, start_step=first, boundary=config.train_boundary,
                     probe_every=config.log_every if run.dist.main else 0, guard=run.guard, forward=run.forward,
                     desc=f'epoch {epoch} train')
    return train_epoch(model, run.train_loader, run.recipe, run.runtime, run.train_set.class_names, plan,
                       on_step=functools.partial(_on_step, run, epoch),
                       on_probe=lambda step, readings: run.health.record(epoch * run.steps_per_epoch + step, epoch,
                                                                         readings))


def _on_step(run: TrainingRun, epoch: int, step: int, loss: torch.Tensor, terms: dict) -> None:
    r"""Every --log-every steps the loss scalars (a host sync besides the non-finite guard's; the mean over the
    processes); every --save-every-steps a mid-epoch last.pt."""
    config, dist = run.config, run.dist
    if step % config.log_every == 0:
        global_step = epoch * run.steps_per_epoch + step
        values = dist.all_reduce(torch.stack([loss.detach().float()] + [v.detach().float()
                                                                         for v in terms.values()])) / dist.world
        run.log.scalar('train/loss_step', float(values[0]), global_step)
        if len(terms) > 1:
            for name, value in zip(terms, values[1:].tolist()):
                run.log.scalar(f'train/loss_{name}_step', value, global_step)
    every = config.save_every_steps
    if every and (step + 1) % every == 0 and step + 1 < run.steps_per_epoch and dist.main:
        save_checkpoint(checkpoint_state(run, epoch, (epoch, step + 1)), run.folder / 'last.pt')


def _validate(run: TrainingRun, epoch: int) -> dict:
    r"""Validation scores of the epoch; the same first --tb-images validation episodes (rank 0's) are drawn."""
    val_set = run.val_set
    run.model.hooks.bind(val_set.name, val_set.class_names)
    val, kept = evaluate(run.model, run.val_loader, run.runtime, val_set.class_names, desc=f'epoch {epoch} val',
                         keep_predictions=run.config.tb_images)
    if kept:
        run.log.image('val/episodes', lambda: figure_array(episode_figure(kept, val_set.class_names)), epoch)
    run.last_val = val
    return val


def _log_epoch(run: TrainingRun, epoch: int, first: int, trn: dict, val: dict, tail: str) -> None:
    log = run.log
    part = f' (steps {first}-{run.steps_per_epoch - 1} after resuming)' if first else ''
    train_loss = 'n/a' if trn['loss'] is None else f'{trn["loss"]:.4f}'
    log.info(f'epoch {epoch:3d} | train loss {train_loss} mIoU {trn["miou"]:5.2f}{part} | val loss '
             f'{val["loss"]:.4f} {format_scores(val)} | {tail}')
    for tag, scores in (('train', trn), ('val', val)):
        for key in ('loss', 'miou', 'fbiou', 'dice'):
            if scores[key] is not None:
                log.scalar(f'{tag}/{key}', scores[key], epoch)
    for name, value in trn.get('loss_terms', {}).items():
        log.scalar(f'train/loss_{name}', value, epoch)


def checkpoint_state(run: TrainingRun, epoch: int, next_step: tuple[int, int], resumable: bool = True) -> dict:
    r"""What inference needs (best.pt: weights, configuration, plug-in record with its settings, scores), plus what
    resuming needs (last.pt: optimizer, schedule, loss scale, RNG)."""
    config, recipe, scaler = run.config, run.recipe, run.runtime.scaler
    weights, identity = checkpoint_model_state(run.model, config)
    state = {'model': weights, 'backbone_identity': identity, 'method': config.model.method,
             'backbone': config.model.backbone, 'config': config.to_dict(checkpoint=True), 'epoch': epoch,
             'next': next_step, 'best': run.best, 'val': run.last_val, 'class_names': run.train_set.class_names,
             'plugin': run.plugin, 'world_size': run.dist.world}
    if resumable:
        state.update(optimizer=recipe.optimizer.state_dict(), rng=rng_state(),
                     scheduler=recipe.scheduler.state_dict() if recipe.scheduler is not None else None,
                     scaler=scaler.state_dict() if scaler is not None else None)
    return state
