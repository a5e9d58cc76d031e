r"""The episode loops shared by train.py, test.py and the demo: every model call goes through the staged pipeline
(`forward` for training, `infer_episode` = `encode` + `infer` at test time, so test-time adaptation can never be
skipped)."""
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from common.checkpoint import NonFiniteError
from common import names
from common.constants import FEW_FOREGROUND, IGNORE_INDEX
from common.names import BOUNDARY_POLICIES
from common.dist import SINGLE, Dist
from common.errors import UserError
from common.metrics import SegmentationMeter
from common.utils import seed_step, to_device
from data.episodic import normalize_images

#: --precision name -> autocast dtype (None: no autocast), from the torch-free list.
PRECISIONS = {name: getattr(torch, dtype) if dtype else None for name, dtype in names.PRECISIONS.items()}


def autocast(device: torch.device, precision: str):
    r"""Mixed-precision context for `precision` ('fp32' = off). Autocast keeps numerically delicate ops (norms,
    softmax, group/layer norm, losses) in fp32; the PATNet/DMTNet rank-2 Gram is computed in float64 explicitly."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def episode_batch(batch: dict, device: torch.device) -> dict:
    r"""A loader batch on `device` (non-blocking copies from pinned memory), with uint8 images (datasets set to
    `as_uint8`, as on CUDA) normalised there."""
    batch = to_device(batch, device)
    for key in ('query_img', 'support_imgs'):
        if batch[key].dtype == torch.uint8:
            batch[key] = normalize_images(batch[key])
    return batch




def episode_inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch['query_img'], batch['support_imgs'], batch['support_masks'], batch['class_id']


def total_loss(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    r"""The sum of a method's (already weighted) loss terms."""
    return sum(terms.values())


def override_recipe(recipe, schedule: str = 'method', total_steps: int = 1, warmup_steps: int = 0,
                    grad_clip: float | None = None):
    r"""Apply train.py's recipe flags to a method's recipe.

    schedule: 'method' keeps the method's own scheduler (its paper's); 'none' (constant), 'cosine' (to 0 at
    `total_steps`) and 'poly' ((1 - t/T)^0.9) replace it, with a linear warm-up over `warmup_steps` (only with
    these; combined with a method's own schedule it would be ambiguous). grad_clip: a max gradient norm that
    replaces the method's (None keeps it; a plug-in's group keeps its own clip, `clip_gradients`).
    """
    check_groups(recipe.optimizer)
    if grad_clip is not None:
        recipe.grad_clip = grad_clip
    if schedule == 'method':
        if warmup_steps:
            raise UserError('--warmup-steps needs --lr-schedule none, cosine or poly (the method\'s own schedule is '
                            'kept by default)')
        return recipe
    total = max(int(total_steps), 1)
    shape = {'none': lambda t: 1.0,
             'cosine': lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)),
             'poly': lambda t: max(1 - t / total, 0.0) ** 0.9}[schedule]

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        return warm * shape(step)
    recipe.scheduler = torch.optim.lr_scheduler.LambdaLR(recipe.optimizer, factor)
    return recipe


def check_groups(optimizer: torch.optim.Optimizer) -> None:
    r"""A group that asks for decoupled weight decay (a plug-in's) gets it: torch's Adam reads
    'decoupled_weight_decay' per group from torch 2.7 on; older releases would silently apply L2 decay instead."""
    for group in optimizer.param_groups:
        if (group.get('decoupled_weight_decay') and group.get('weight_decay')
                and isinstance(optimizer, torch.optim.Adam)
                and 'decoupled_weight_decay' not in optimizer.defaults):
            raise UserError(f'the {group.get("name", "plug-in")} optimiser group asks for decoupled weight decay, '
                            f'which torch {torch.__version__}\'s Adam does not have (torch >= 2.7 does); upgrade '
                            'torch, or pass --cdtg-weight-decay 0')


def clip_gradients(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                   clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Clip the gradients of every optimiser group that has a 'max_grad_norm' of its own (a plug-in's) to it, then
    clip the total gradient norm of `params` to `clip` (inf: measured only). Returns that total norm (a non-finite
    gradient keeps it non-finite, for the guard) and each such group's norm before its clip, by group name."""
    groups = {}
    for group in optimizer.param_groups:
        if group.get('max_grad_norm'):
            groups[group.get('name', 'group')] = torch.nn.utils.clip_grad_norm_(group['params'],
                                                                                group['max_grad_norm'])
    return torch.nn.utils.clip_grad_norm_(params, clip), groups


def probe_readings(pred: torch.Tensor, batch: dict, readings: dict) -> dict:
    r"""A training step's health readings: the predicted and the true foreground fraction of the batch's queries
    (label-255 pixels left out of the latter), and the plug-in's `readings` of its forward."""
    mask = batch['query_mask']
    valid = mask != IGNORE_INDEX
    return {'fg_fraction': float(pred.float().mean()),
            'gt_fg_fraction': float((mask == 1).sum() / valid.sum().clamp_min(1)), **readings}


class NonFiniteGuard:
    r"""Stops training at the first non-finite loss or gradient (or skips up to `skips` such steps with a warning),
    before the optimizer step, so no weight ever becomes NaN."""

    def __init__(self, skips: int = 0, last_checkpoint: Path | None = None):
        self.skips, self.skipped, self.last_checkpoint = skips, 0, last_checkpoint

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor, epoch: int, step: int, dist: Dist = SINGLE) -> bool:
        r"""True if the step may proceed; False to skip it; raises `NonFiniteError` to stop. In a distributed run
        the verdict is agreed by all processes (so they skip or stop together)."""
        flags = torch.stack([torch.isfinite(loss), torch.isfinite(grad_norm)]).to(torch.int32)
        flags = dist.all_reduce(flags, op='min')
        if bool(flags.all()):                               # one host sync per step
            return True
        what = 'loss' if not bool(flags[0]) else 'gradient'
        where = f'epoch {epoch}, step {step}'
        if self.skipped < self.skips:
            self.skipped += 1
            warnings.warn(f'non-finite {what} at {where}: step skipped ({self.skipped} of --skip-nonfinite '
                          f'{self.skips})', stacklevel=2)
            return False
        last = self.last_checkpoint
        if last is not None and last.is_file():
            saved = (f'The last checkpoint written ({last}) is intact and finite; lower --lr and start a new '
                     '--logpath (or --resume from it),')
        else:
            saved = 'No checkpoint was written before this step; lower --lr and start again,'
        raise NonFiniteError(
            f'training stopped: the {what} became NaN/inf at {where}, before any weight changed. Likely causes: a '
            'learning rate too high for this method (--lr), an empty or all-ignored mask batch, or fp16 overflow. '
            f'{saved} or pass --skip-nonfinite N to skip up to N such steps')


def training_batch(batch: dict, boundary: str) -> dict:
    r"""The batch the training loss sees: with boundary 'background', label-255 query pixels become background (0);
    with 'ignore' they stay 255, which every method's loss ignores. The metrics keep reading the original mask."""
    if boundary not in BOUNDARY_POLICIES:
        raise ValueError(f'boundary policy must be one of {BOUNDARY_POLICIES}, got {boundary!r}')
    if boundary == 'ignore':
        return batch
    mask = batch['query_mask']
    return dict(batch, query_mask=mask.masked_fill(mask == IGNORE_INDEX, 0))


@dataclass
class Runtime:
    r"""Where and how the loops run: the device, the process group (`dist`: scores are all-reduced over it), the
    autocast precision ('bf16'/'fp16' run the forward under autocast) and, for fp16 training, the loss scaler (a
    `torch.amp.GradScaler`). A bare device is `Runtime(device)`."""
    device: torch.device
    dist: Dist = SINGLE
    precision: str = 'fp32'
    scaler: object | None = None

    @classmethod
    def of(cls, where: 'Runtime | torch.device') -> 'Runtime':
        return where if isinstance(where, Runtime) else cls(torch.device(where))


@dataclass
class EpochPlan:
    r"""How one training epoch runs: its index and the run's seed (every step seeds its random streams from (seed,
    epoch, step)), the step it starts at (a resumed run), what the loss does with label-255 pixels
    (`training_batch`), the health-probe cadence (every `probe_every` steps; 0 = never), the non-finite guard (kept
    across epochs), the module the batches go through (the DDP-wrapped model in a distributed run; None: the model)
    and the progress-bar label."""
    epoch: int = 0
    seed: int = 0
    start_step: int = 0
    boundary: str = 'background'
    probe_every: int = 0
    guard: NonFiniteGuard | None = None
    forward: object | None = None
    desc: str = 'train'


def train_epoch(model, loader, recipe, runtime: 'Runtime | torch.device', class_names: list[str],
                plan: EpochPlan | None = None, on_step=None, on_probe=None) -> dict:
    r"""One pass over the training episodes (from `plan.start_step` on, when resuming mid-epoch) with the method's
    recipe (optimizer, per-step LR schedule, gradient clipping).

    Every step first seeds the random streams from (seed, epoch, step) (`common.utils.seed_step`), so its random
    draws are the same in a straight and a resumed run, for any number of loader workers. The guard checks the loss
    and the gradient norm before the optimizer step. `on_step(step, loss, terms)` may log or checkpoint (and is the
    only place that reads the loss on the host besides the guard); on a probed step `on_probe(step, readings)`
    receives `probe_readings` (after the step). Returns the scores of the steps run, with the mean of each loss term,
    all-reduced over the processes of a distributed run (each holding its share of the global batch).
    """
    runtime, plan = Runtime.of(runtime), plan or EpochPlan()
    plan.guard = plan.guard or NonFiniteGuard()
    model.train()
    meter = SegmentationMeter(class_names, runtime.device)
    term_sums: dict[str, torch.Tensor] = {}
    params = model.trainable_parameters()
    for step, batch in enumerate(tqdm(loader, desc=plan.desc, leave=False, mininterval=2, dynamic_ncols=True),
                                 start=plan.start_step):
        seed_step(plan.seed, plan.epoch, step)
        batch = episode_batch(batch, runtime.device)
        probing = on_probe is not None and plan.probe_every > 0 and step % plan.probe_every == 0
        done = _training_step(model, batch, recipe, runtime, plan, step, probing, params)
        if done is None:                                    # a non-finite step the guard skips
            continue
        output, terms, loss, readings = done
        with torch.no_grad():
            pred = model.segment(output)
            meter.update(pred, batch['query_mask'], batch['class_id'], loss.detach())
            for name, value in terms.items():
                term_sums[name] = term_sums.get(name, 0) + value.detach() * batch['class_id'].numel()
        if on_step is not None:
            on_step(step, loss, terms)
        if probing:
            on_probe(step, probe_readings(pred, batch, readings))
    return _epoch_scores(meter, term_sums, runtime)


def _training_step(model, batch: dict, recipe, runtime: Runtime, plan: EpochPlan, step: int, probing: bool,
                   params: list[torch.Tensor]):
    r"""Forward, loss, backward, clipping, the guard's check and the optimizer and scheduler step of one batch:
    (output, loss terms, loss, health readings or None), or None when the guard skips the step."""
    hooks, optimizer, scaler = model.hooks, recipe.optimizer, runtime.scaler
    with autocast(runtime.device, runtime.precision):
        hooks.probing = probing
        try:
            output = (plan.forward or model)(*episode_inputs(batch))
        finally:
            hooks.probing = False
        terms = model.loss(output, training_batch(batch, plan.boundary))
        loss = total_loss(terms)
    readings = hooks.readings() if probing else None
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    clip = recipe.grad_clip if recipe.grad_clip else float('inf')
    grad_norm, group_norms = clip_gradients(optimizer, params, clip)          # clipped only where asked
    if scaler is not None:                     # fp16: inf gradients are overflow; the scaler skips those steps
        grad_norm = grad_norm.new_zeros(())
    if not plan.guard.check(loss.detach(), grad_norm, plan.epoch, step, runtime.dist):
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        return None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if recipe.scheduler is not None:
        recipe.scheduler.step()
    if probing:
        readings.update({f'grad_norm_{name}': float(norm) for name, norm in group_norms.items()})
    return output, terms, loss, readings


def _epoch_scores(meter: SegmentationMeter, term_sums: dict, runtime: Runtime) -> dict:
    meter.all_reduce(runtime.dist)
    if not meter.loss_n:
        return {'loss': None, 'miou': float('nan'), 'fbiou': float('nan'), 'dice': float('nan')}
    scores = meter.compute()
    names = sorted(term_sums)
    stacked = [torch.as_tensor(term_sums[k], dtype=torch.float64, device=runtime.device) for k in names]
    sums = runtime.dist.all_reduce(torch.stack(stacked)) if names else []
    scores['loss_terms'] = {name: float(v) / meter.loss_n for name, v in zip(names, sums)}
    return scores


@torch.no_grad()
def evaluate(model, loader, runtime: 'Runtime | torch.device', class_names: list[str], desc: str = 'eval',
             keep_predictions: int = 0, miou_over: str = 'all') -> tuple[dict, list[dict]]:
    r"""Predict every episode of `loader` through the test-time entry point (`infer_episode`: `infer`, which
    adapts per episode when the method is set to, on the encoded episode) and return the scores (mIoU averaged
    `miou_over` the classes, see common/metrics.py; label 255 ignored) and, for the first `keep_predictions` episodes
    of this process, the CPU tensors needed to draw them. In a distributed run each process evaluates its share of
    the episodes and the per-class sums are all-reduced, so every process returns the scores of all episodes."""
    runtime = Runtime.of(runtime)
    device, dist = runtime.device, runtime.dist
    model.eval()
    meter = SegmentationMeter(class_names, device, over=miou_over)
    kept: list[dict] = []
    start, n = time.perf_counter(), 0
    shots = 0
    degenerate = {kind: [0, None] for kind in DEGENERATE_SUPPORTS}                     # kind -> [count, example]
    for batch in tqdm(loader, desc=desc, leave=False, mininterval=2, dynamic_ncols=True):
        batch = episode_batch(batch, device)
        fg = (batch['support_masks'] == 1).flatten(2)
        pixels = fg.sum(dim=2)                                                           # [B,K]
        shots += pixels.numel()
        hits = torch.stack([pixels == 0, pixels == fg.shape[2],                          # DEGENERATE_SUPPORTS' order
                            (pixels > 0) & (pixels < FEW_FOREGROUND)])
        if bool(hits.any()):                                                             # one host sync per batch
            for count_example, hit in zip(degenerate.values(), hits):
                if bool(hit.any()):
                    count_example[0] += int(hit.sum())
                    b, k = hit.nonzero()[0].tolist()
                    count_example[1] = count_example[1] or batch['support_names'][b][k]
        with autocast(device, runtime.precision):
            output = model.infer_episode(*episode_inputs(batch))
            loss = total_loss(model.loss(output, batch))
        pred = model.segment(output)
        meter.update(pred, batch['query_mask'], batch['class_id'], loss)
        n += pred.shape[0]
        for i in range(pred.shape[0]):
            if len(kept) >= keep_predictions:
                break
            kept.append({'query_img': batch['query_img'][i].cpu(), 'query_mask': batch['query_mask'][i].cpu(),
                         'support_imgs': batch['support_imgs'][i].cpu(),
                         'support_masks': batch['support_masks'][i].cpu(), 'pred': pred[i].cpu(),
                         'class_id': int(batch['class_id'][i]), 'query_name': batch['query_name'][i]})
    counts = dist.all_reduce(torch.tensor([shots, n] + [c for c, _ in degenerate.values()], dtype=torch.int64,
                                          device=device)).tolist()
    shots = counts[0]
    scores = meter.all_reduce(dist).compute()
    scores['seconds_per_episode'] = (time.perf_counter() - start) / max(counts[1], 1) * dist.world
    for (kind, (_, example)), count in zip(degenerate.items(), counts[2:]):
        scores[f'{kind}_support_masks'] = count
        if count and dist.main:
            warnings.warn(f'{count} of {shots} support masks {DEGENERATE_SUPPORTS[kind]} at this image size (e.g. '
                          f'{example}); counted in results.json as {kind}_support_masks', stacklevel=2)
    return scores, kept


#: Support masks the evaluation counts and warns about (at the model's input size): kind -> what is wrong.
DEGENERATE_SUPPORTS = {
    'empty': 'have no foreground pixel, so those shots carry no information (scripts/check_data.py lists empty '
             'masks)',
    'all_foreground': 'are foreground everywhere (no background to contrast with)',
    'few_foreground': f'have fewer than {FEW_FOREGROUND} foreground pixels',
}
