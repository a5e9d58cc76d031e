r"""The episode loops shared by train.py, test.py and the demo: every model call goes through the staged pipeline
(`forward` for training, `encode` + `infer` at test time, so test-time adaptation can never be skipped)."""
import time

import torch
from tqdm import tqdm

from common.constants import IGNORE_INDEX
from common.metrics import SegmentationMeter
from common.utils import to_device

#: What the training loss does with label-255 pixels (PASCAL's object boundaries): 'background' trains them as
#: background, as HSNet's and PATNet's reference training does (plain cross-entropy, no ignore index); 'ignore'
#: leaves them out of the loss. Evaluation always ignores them.
BOUNDARY_POLICIES = ('background', 'ignore')


def episode_inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch['query_img'], batch['support_imgs'], batch['support_masks'], batch['class_id']


def total_loss(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    r"""The sum of a method's (already weighted) loss terms."""
    return sum(terms.values())


def training_batch(batch: dict, boundary: str) -> dict:
    r"""The batch the training loss sees: with boundary 'background', label-255 query pixels become background (0);
    with 'ignore' they stay 255, which every method's loss ignores. The metrics keep reading the original mask."""
    if boundary not in BOUNDARY_POLICIES:
        raise ValueError(f'boundary policy must be one of {BOUNDARY_POLICIES}, got {boundary!r}')
    if boundary == 'ignore':
        return batch
    mask = batch['query_mask']
    return dict(batch, query_mask=mask.masked_fill(mask == IGNORE_INDEX, 0))


def train_epoch(model, loader, recipe, device: torch.device, class_names: list[str], desc: str = 'train',
                on_step=None, boundary: str = 'background') -> dict:
    r"""One pass over the training episodes with the method's recipe (optimizer, per-step LR schedule, gradient
    clipping). `on_step(step, loss, terms)` may log (and is the only place that reads the loss on the host, so
    callers control synchronisation). `boundary`: what the loss does with label-255 pixels (`training_batch`).
    Returns the epoch's scores, with the mean of each loss term."""
    model.train()
    meter = SegmentationMeter(class_names, device)
    term_sums: dict[str, torch.Tensor] = {}
    params = model.trainable_parameters() if recipe.grad_clip else None
    for step, batch in enumerate(tqdm(loader, desc=desc, leave=False, mininterval=2, dynamic_ncols=True)):
        batch = to_device(batch, device)
        output = model(*episode_inputs(batch))
        terms = model.loss(output, training_batch(batch, boundary))
        loss = total_loss(terms)
        recipe.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        recipe.optimizer.step()
        if recipe.scheduler is not None:
            recipe.scheduler.step()
        with torch.no_grad():
            meter.update(model.segment(output), batch['query_mask'], batch['class_id'], loss.detach())
            for name, value in terms.items():
                term_sums[name] = term_sums.get(name, 0) + value.detach() * batch['class_id'].numel()
        if on_step is not None:
            on_step(step, loss, terms)
    scores = meter.compute()
    if meter.loss_n:
        scores['loss_terms'] = {name: float(v) / meter.loss_n for name, v in term_sums.items()}
    return scores


@torch.no_grad()
def evaluate(model, loader, device: torch.device, class_names: list[str], desc: str = 'eval',
             keep_predictions: int = 0, miou_over: str = 'all') -> tuple[dict, list[dict]]:
    r"""Predict every episode of `loader` through the test-time entry point (`infer`, which adapts per episode
    when the method is set to) and return the scores (mIoU averaged `miou_over` the classes, see common/metrics.py;
    label 255 ignored) and, for the first `keep_predictions` episodes, the CPU tensors needed to draw them."""
    model.eval()
    meter = SegmentationMeter(class_names, device, over=miou_over)
    kept: list[dict] = []
    start, n = time.perf_counter(), 0
    for batch in tqdm(loader, desc=desc, leave=False, mininterval=2, dynamic_ncols=True):
        batch = to_device(batch, device)
        output = model.infer(model.encode(*episode_inputs(batch)))
        pred = model.segment(output)
        meter.update(pred, batch['query_mask'], batch['class_id'], total_loss(model.loss(output, batch)))
        n += pred.shape[0]
        for i in range(pred.shape[0]):
            if len(kept) >= keep_predictions:
                break
            kept.append({'query_img': batch['query_img'][i].cpu(), 'query_mask': batch['query_mask'][i].cpu(),
                         'support_imgs': batch['support_imgs'][i].cpu(),
                         'support_masks': batch['support_masks'][i].cpu(), 'pred': pred[i].cpu(),
                         'class_id': int(batch['class_id'][i]), 'query_name': batch['query_name'][i]})
    scores = meter.compute()
    scores['seconds_per_episode'] = (time.perf_counter() - start) / max(n, 1)
    return scores, kept
