r"""Class-wise accumulated IoU (mIoU), FB-IoU and Dice, as defined by HSNet/PATNet.

Per episode we count background and foreground intersection and union over the pixels that are not ignored, and
add them into per-class int64 buffers (no host synchronisation per episode; float32 buffers lose exactness after
~2^24 pixels). At the end:
  * class IoU_c   = ΣI_c / max(ΣU_c, 1) for the foreground;
  * mIoU          = mean_c IoU_c over the classes of the split (`over='all'`, the reference's convention: HSNet's
                    and PATNet's evaluator average over every class of interest, so a class without episodes counts
                    0), or over the classes that had at least one episode (`over='seen'`);
  * FB-IoU        = mean over {bg, fg} of (Σ_c I / Σ_c U), pooled over the classes (a class without episodes adds
                    nothing, so both conventions agree);
  * class Dice_c  = 2ΣI_c / (ΣI_c + ΣU_c) for the foreground (ΣI + ΣU = |pred| + |gt|), Dice = mean_c Dice_c
                    under the same convention as mIoU.
With the default episode lists (episode i takes class i mod #classes) every class has episodes as soon as there
are at least as many episodes as classes; the conventions differ only for shorter lists or unusable classes.
"""
import torch

from common.constants import IGNORE_INDEX
from common.names import MIOU_OVER  # noqa: F401  (how mIoU and Dice average over classes; see above)


def intersection_union(pred: torch.Tensor, gt: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    r"""Per-episode areas. pred [B,H,W] in {0,1}; gt [B,H,W] in {0,1,ignore}. Returns inter, union [B,2] (bg, fg)."""
    if pred.shape != gt.shape:
        raise ValueError(f'prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape')
    valid = gt != ignore_index
    p_fg = (pred == 1) & valid
    g_fg = (gt == 1) & valid
    p_bg = valid & ~p_fg
    g_bg = valid & ~g_fg
    dims = tuple(range(1, pred.dim()))
    inter = torch.stack([(p_bg & g_bg).sum(dims), (p_fg & g_fg).sum(dims)], dim=1)
    union = torch.stack([(p_bg | g_bg).sum(dims), (p_fg | g_fg).sum(dims)], dim=1)
    return inter, union


class SegmentationMeter:
    r"""Accumulates per-class intersection/union on the metric's device and reports mIoU, FB-IoU and Dice (%).

    Args:
        class_names: every class of the split (the classes mIoU averages over with `over='all'`).
        over: 'all' (the reference's convention) or 'seen' (see the module docstring).
    """

    def __init__(self, class_names: list[str], device: torch.device | str = 'cpu', ignore_index: int = IGNORE_INDEX,
                 over: str = 'all'):
        if over not in MIOU_OVER:
            raise ValueError(f'mIoU convention must be one of {MIOU_OVER}, got {over!r}')
        self.class_names = list(class_names)
        self.over = over
        self.ignore_index = ignore_index
        n = len(self.class_names)
        self.inter = torch.zeros(n, 2, dtype=torch.int64, device=device)
        self.union = torch.zeros(n, 2, dtype=torch.int64, device=device)
        self.count = torch.zeros(n, dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_n = 0

    def update(self, pred: torch.Tensor, gt: torch.Tensor, class_id: torch.Tensor, loss: torch.Tensor | None = None):
        inter, union = intersection_union(pred, gt.to(pred.device), self.ignore_index)
        class_id = class_id.to(self.inter.device).long()
        self.inter.index_add_(0, class_id, inter.to(self.inter.device))
        self.union.index_add_(0, class_id, union.to(self.union.device))
        self.count.index_add_(0, class_id, torch.ones_like(class_id))
        if loss is not None:
            self.loss_sum += loss.detach().to(self.loss_sum.device, torch.float64) * class_id.numel()
            self.loss_n += class_id.numel()

    def all_reduce(self, dist) -> 'SegmentationMeter':
        r"""Sum the buffers over the processes of a distributed run (`common.dist.Dist`; a no-op in one process), so
        the scores are exactly those of a single process over all episodes (integer sums are order-independent)."""
        if dist.enabled:
            for t in (self.inter, self.union, self.count):
                dist.all_reduce(t)
            loss = torch.stack([self.loss_sum, self.loss_sum.new_tensor(float(self.loss_n))])
            dist.all_reduce(loss)
            self.loss_sum, self.loss_n = loss[0], int(loss[1])
        return self

    def compute(self) -> dict:
        r"""Read the buffers once (one host sync) and return the scores in percent, with the averaging convention
        (`metric`) and the classes that had no episode (`classes_without_episodes`)."""
        inter, union, count = self.inter.cpu().double(), self.union.cpu().double(), self.count.cpu()
        seen = count > 0
        if not bool(seen.any()):
            raise ValueError('no episode was evaluated')
        iou = inter[:, 1] / union[:, 1].clamp(min=1)           # 0 for a class without episodes
        dice = 2 * inter[:, 1] / (inter[:, 1] + union[:, 1]).clamp(min=1)
        pooled_i, pooled_u = inter[seen].sum(0), union[seen].sum(0)
        fbiou = (pooled_i / pooled_u.clamp(min=1)).mean()
        averaged = seen if self.over == 'seen' else torch.ones_like(seen)
        return {
            'miou': float(iou[averaged].mean() * 100),
            'fbiou': float(fbiou * 100),
            'dice': float(dice[averaged].mean() * 100),
            'metric': metric_record(self.over, len(self.class_names)),
            'classes_without_episodes': [name for c, name in enumerate(self.class_names) if not seen[c]],
            'per_class': {name: float(iou[c] * 100) for c, name in enumerate(self.class_names) if seen[c]},
            'per_class_dice': {name: float(dice[c] * 100) for c, name in enumerate(self.class_names) if seen[c]},
            'episodes_per_class': {name: int(count[c]) for c, name in enumerate(self.class_names) if seen[c]},
            'loss': float(self.loss_sum / self.loss_n) if self.loss_n else None,
        }


def metric_record(over: str, n_classes: int) -> dict:
    r"""How a score was computed, for results.json."""
    return {'miou_over': over, 'classes': n_classes, 'ignore_label': IGNORE_INDEX,
            'definition': 'class-wise accumulated foreground IoU, mean over '
                          + ('every class of the split (no episodes: 0)' if over == 'all' else
                             'the classes with episodes')}


def format_scores(scores: dict) -> str:
    return f"mIoU: {scores['miou']:.2f}  FB-IoU: {scores['fbiou']:.2f}  Dice: {scores['dice']:.2f}"
