r"""The episode loops shared by train.py, test.py and the demo."""
import time

import torch
from tqdm import tqdm

from common.metrics import SegmentationMeter
from common.utils import to_device


def train_epoch(model, loader, optimizer, device: torch.device, class_names: list[str], desc: str = 'train',
                on_step=None) -> dict:
    r"""One pass over the training episodes. `on_step(step, loss_tensor)` may log (and is the only place that
    reads the loss on the host, so callers control synchronisation)."""
    model.train()
    meter = SegmentationMeter(class_names, device)
    for step, batch in enumerate(tqdm(loader, desc=desc, leave=False, mininterval=2, dynamic_ncols=True)):
        batch = to_device(batch, device)
        logits = model(batch['query_img'], batch['support_imgs'], batch['support_masks'], batch['class_id'])
        loss = model.loss(logits, batch['query_mask'])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            meter.update(model.aggregate(logits.detach()), batch['query_mask'], batch['class_id'], loss.detach())
        if on_step is not None:
            on_step(step, loss)
    return meter.compute()


@torch.no_grad()
def evaluate(model, loader, device: torch.device, class_names: list[str], desc: str = 'eval',
             keep_predictions: int = 0) -> tuple[dict, list[dict]]:
    r"""Predict every episode of `loader` (K-shot vote) and return the scores and, for the first
    `keep_predictions` episodes, the CPU tensors needed to draw them."""
    model.eval()
    meter = SegmentationMeter(class_names, device)
    kept: list[dict] = []
    start, n = time.perf_counter(), 0
    for batch in tqdm(loader, desc=desc, leave=False, mininterval=2, dynamic_ncols=True):
        batch = to_device(batch, device)
        logits = model.episode_logits(batch['query_img'], batch['support_imgs'], batch['support_masks'],
                                      batch['class_id'])
        pred = model.aggregate(logits)
        meter.update(pred, batch['query_mask'], batch['class_id'], model.loss(logits, batch['query_mask']))
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
