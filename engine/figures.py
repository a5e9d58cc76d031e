r"""Figures of predicted episodes (supports with their masks, the query with ground truth and prediction) and the
small matplotlib helpers shared by test.py, train.py's TensorBoard images and scripts/report.py."""
from pathlib import Path

import numpy as np
import torch

from common.constants import IMAGENET_MEAN, IMAGENET_STD


def to_rgb(img: torch.Tensor) -> np.ndarray:
    r"""An ImageNet-normalised image [3,H,W] back to RGB in [0, 1], [H,W,3]."""
    x = img.float() * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def tint(rgb: np.ndarray, mask: torch.Tensor, colour) -> np.ndarray:
    r"""`rgb` with the pixels where mask == 1 blended half-way towards `colour`."""
    m = (mask.numpy() == 1)[..., None]
    return np.where(m, 0.5 * rgb + 0.5 * np.array(colour), rgb)


def episode_figure(episodes: list[dict], class_names: list[str], title: str = ''):
    r"""A matplotlib figure, one row per episode: K supports (mask in blue) | query with ground truth (green) |
    prediction (red, with the episode's IoU). Episodes are `engine.loops.evaluate`'s kept predictions."""
    plt = pyplot()
    k = max(e['support_imgs'].shape[0] for e in episodes)
    fig, axes = plt.subplots(len(episodes), k + 2, figsize=(2.2 * (k + 2), 2.3 * len(episodes)), squeeze=False)
    for row, ep in zip(axes, episodes):
        for ax in row:
            ax.axis('off')
        for s in range(ep['support_imgs'].shape[0]):
            row[s].imshow(tint(to_rgb(ep['support_imgs'][s]), ep['support_masks'][s], (0.1, 0.3, 1.0)))
            row[s].set_title(f'support {s + 1}', fontsize=8)
        query = to_rgb(ep['query_img'])
        row[k].imshow(tint(query, ep['query_mask'], (0.1, 0.9, 0.2)))
        row[k].set_title(f'query GT: {class_names[ep["class_id"]]}', fontsize=8)
        row[k + 1].imshow(tint(query, ep['pred'], (1.0, 0.15, 0.1)))
        row[k + 1].set_title(f'prediction (IoU {episode_iou(ep["pred"], ep["query_mask"]):.1f})', fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_episode_figure(episodes: list[dict], class_names: list[str], path: str | Path, title: str = '') -> Path:
    r"""`episode_figure` saved as a PNG."""
    fig = episode_figure(episodes, class_names, title)
    return save_figure(fig, path, dpi=80)


def episode_iou(pred: torch.Tensor, mask: torch.Tensor) -> float:
    r"""Foreground IoU (percent) of one binary prediction against a 0/1/255 mask (255 ignored; 0 when both are
    empty, as an empty union scores nothing)."""
    gt, fg = mask == 1, pred == 1
    valid = mask != 255
    return 100.0 * float((gt & fg & valid).sum()) / max(float(((gt | fg) & valid).sum()), 1.0)


def pyplot():
    r"""matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path, dpi: int = 100, formats: tuple[str, ...] = ()) -> Path:
    r"""Save `fig` to `path` (and to the same stem with each extra format, e.g. ('pdf',)), then close it. The
    bounding box is fitted to the content, so a figure legend is never cut off."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches='tight')
    for ext in formats:
        fig.savefig(path.with_suffix(f'.{ext}'), bbox_inches='tight')
    pyplot().close(fig)
    return path


def figure_array(fig, dpi: int = 60) -> np.ndarray:
    r"""The figure rendered to an RGB uint8 array [H,W,3] (for TensorBoard), then closed."""
    fig.set_dpi(dpi)
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    pyplot().close(fig)
    return arr
