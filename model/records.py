r"""The records a method's pipeline passes between its stages (model/base.py): the episode context the plug-in hooks
see, the encoded supports, the encoded episode, the matcher's output, and a method's training recipe and test-time
adaptation settings. Plain data; model/base.py (the interface) and model/adapt.py (test-time adaptation) both import
them, and neither imports the other at module level.
"""
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# --- records ------------------------------------------------------------------------------------------------------
@dataclass
class EpisodeContext:
    r"""What hooks may look at besides the features of one forward pass.

    Attributes:
        class_id: [B] dataset class index of each episode (a plug-in maps it to its text).
        nshot: K; support tensors hold B*K items, support b*K+k belongs to episode b.
        support_masks: [B*K,H,W] float in {0,1} at image resolution.
    """
    class_id: torch.Tensor
    nshot: int
    support_masks: torch.Tensor


@dataclass
class SupportSet:
    r"""Encoded supports of B episodes: images [B,K,3,H,W], masks [B,K,H,W] (float), taps per level [B*K,...]
    (after the plug-in's `support_features` hook). Encoded once, it can serve many queries (`select`)."""
    imgs: torch.Tensor
    masks: torch.Tensor
    feats: list[torch.Tensor]
    class_id: torch.Tensor

    @property
    def nshot(self) -> int:
        return self.imgs.shape[1]

    def context(self) -> 'EpisodeContext':
        r"""The hooks' context of these supports (and of the queries matched against them)."""
        return EpisodeContext(self.class_id, self.nshot, self.masks.flatten(0, 1))

    def select(self, index: torch.Tensor | list[int]) -> 'SupportSet':
        r"""The support sets of the given episodes (e.g. one of 3 CHAOS chunks per query slice)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.imgs.device)
        k = self.nshot
        rows = (index[:, None] * k + torch.arange(k, device=index.device)).flatten()
        return SupportSet(self.imgs[index], self.masks[index], [f[rows] for f in self.feats], self.class_id[index])


@dataclass
class EpisodeRecord:
    r"""What `encode` returns for B episodes: everything `match` needs.

    Attributes:
        query_img: [B,3,H,W]; query_feats: taps per level [B,...] (query encoded once for all K shots).
        supports: the encoded `SupportSet` (support_feats [B*K,...]).
        ctx: the hooks' `EpisodeContext`.
        state: per-episode tensors a method adds (e.g. Q-Net's refined prototype during test-time adaptation); they
            live and die with the record, so nothing in it can carry over to another episode.
    """
    query_img: torch.Tensor
    query_feats: list[torch.Tensor]
    supports: SupportSet
    ctx: EpisodeContext
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def support_feats(self) -> list[torch.Tensor]:
        return self.supports.feats

    @property
    def batch(self) -> int:
        return self.query_img.shape[0]

    @property
    def nshot(self) -> int:
        return self.ctx.nshot

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.query_img.shape[-2:])

    def episode(self, i: int) -> 'EpisodeRecord':
        r"""Episode i alone (the adaptation harness adapts episodes one by one)."""
        k = self.nshot
        sup = self.supports
        sl = slice(i * k, (i + 1) * k)
        return EpisodeRecord(self.query_img[i:i + 1], [f[i:i + 1] for f in self.query_feats],
                             SupportSet(sup.imgs[i:i + 1], sup.masks[i:i + 1], [f[sl] for f in sup.feats],
                                        sup.class_id[i:i + 1]),
                             EpisodeContext(self.ctx.class_id[i:i + 1], k, self.ctx.support_masks[sl]))

    def shot(self, k: int) -> 'EpisodeRecord':
        r"""The B episodes with their k-th support only (1-shot records sharing the encoded query). Support b*K+k of
        the B*K rows is row k, k+K, ...: a strided view, no copy of the support features."""
        n = self.nshot
        sup = self.supports
        return EpisodeRecord(self.query_img, self.query_feats,
                             SupportSet(sup.imgs[:, k:k + 1], sup.masks[:, k:k + 1], [f[k::n] for f in sup.feats],
                                        sup.class_id),
                             EpisodeContext(self.ctx.class_id, 1, self.ctx.support_masks[k::n]))

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> 'EpisodeRecord':
        r"""A record whose tensors are `fn(tensor)` (e.g. clones made outside inference mode)."""
        def apply(x):
            if isinstance(x, torch.Tensor):
                return fn(x)
            if isinstance(x, list):
                return [apply(v) for v in x]
            if isinstance(x, dict):
                return {k: apply(v) for k, v in x.items()}
            return x
        sup = self.supports
        return EpisodeRecord(apply(self.query_img), apply(self.query_feats),
                             SupportSet(apply(sup.imgs), apply(sup.masks), apply(sup.feats), apply(sup.class_id)),
                             EpisodeContext(apply(self.ctx.class_id), self.ctx.nshot, apply(self.ctx.support_masks)),
                             apply(self.state))


@dataclass
class Output:
    r"""What `match` returns.

    Attributes:
        logits: 2-class scores at image resolution, shaped by the method's K-shot policy: 'vote' [B,K,2,H,W] (one
            prediction per shot), 'joint' [B,2,H,W]. Methods that predict probabilities return log-probabilities
            (then cross-entropy is their negative log-likelihood).
        aux: method-specific tensors its `loss` needs (auxiliary heads, prototypes, ...).
    """
    logits: torch.Tensor
    aux: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    r"""A method's training recipe: the optimizer over its trainable parameters (param groups as the paper), an LR
    scheduler stepped after every optimizer step (or None), and a gradient-norm clip (or None)."""
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    grad_clip: float | None = None


@dataclass
class Adaptation:
    r"""Test-time adaptation settings: `steps` optimizer steps with learning rate `lr` per episode (0 = off)."""
    steps: int = 0
    lr: float = 1e-3
