r"""A PNG figure of predicted episodes: supports with their masks, the query with ground truth and prediction."""
from pathlib import Path

import numpy as np
import torch

from common.constants import IMAGENET_MEAN, IMAGENET_STD


def _to_rgb(img: torch.Tensor) -> np.ndarray:
    x = img.float() * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def _overlay(rgb: np.ndarray, mask: torch.Tensor, colour) -> np.ndarray:
    m = (mask.numpy() == 1)[..., None]
    return np.where(m, 0.5 * rgb + 0.5 * np.array(colour), rgb)


def save_episode_figure(episodes: list[dict], class_names: list[str], path: str | Path, title: str = '') -> Path:
    r"""One row per episode: K supports (mask in blue) | query with ground truth (green) | prediction (red)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    k = max(e['support_imgs'].shape[0] for e in episodes)
    fig, axes = plt.subplots(len(episodes), k + 2, figsize=(2.2 * (k + 2), 2.3 * len(episodes)), squeeze=False)
    for row, ep in zip(axes, episodes):
        for ax in row:
            ax.axis('off')
        for s in range(ep['support_imgs'].shape[0]):
            row[s].imshow(_overlay(_to_rgb(ep['support_imgs'][s]), ep['support_masks'][s], (0.1, 0.3, 1.0)))
            row[s].set_title(f'support {s + 1}', fontsize=8)
        query = _to_rgb(ep['query_img'])
        row[k].imshow(_overlay(query, ep['query_mask'], (0.1, 0.9, 0.2)))
        row[k].set_title(f'query GT: {class_names[ep["class_id"]]}', fontsize=8)
        gt, pred = ep['query_mask'] == 1, ep['pred'] == 1
        valid = ep['query_mask'] != 255
        iou = float((gt & pred & valid).sum()) / max(float(((gt | pred) & valid).sum()), 1.0)
        row[k + 1].imshow(_overlay(query, ep['pred'], (1.0, 0.15, 0.1)))
        row[k + 1].set_title(f'prediction (IoU {100 * iou:.1f})', fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
