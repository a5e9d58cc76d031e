r"""The method interface every few-shot segmenter implements, and the identity plug-in hooks."""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UserError
from model.backbone import Backbone

IGNORE_INDEX = 255


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


class Hooks(nn.Module):
    r"""Identity plug-in. A plug-in (e.g. CD-TG) subclasses this and is attached with `method.attach(plugin)`.

    Every method calls `query_features` and `support_features` on the backbone taps before matching; methods with
    prototypes also call `prototypes` on their foreground/background prototypes before using them.
    """

    def bind(self, benchmark: str, class_names: list[str]) -> None:
        r"""Called before running episodes of `benchmark`, whose `class_id`s index `class_names`."""

    def query_features(self, feats: list[torch.Tensor], ctx: EpisodeContext) -> list[torch.Tensor]:
        r"""feats: per tap [B,C_l,h_l,w_l] (query encoded once for all K shots)."""
        return feats

    def support_features(self, feats: list[torch.Tensor], ctx: EpisodeContext) -> list[torch.Tensor]:
        r"""feats: per tap [B*K,C_l,h_l,w_l], before any masking."""
        return feats

    def prototypes(self, fg: list[torch.Tensor], bg: list[torch.Tensor], feats: list[torch.Tensor],
                   ctx: EpisodeContext) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        r"""fg/bg: per level [B*K,C_l]; feats: the (unmasked) support features they were pooled from."""
        return fg, bg


class FewShotSegmenter(nn.Module):
    r"""Base class: a frozen backbone, a learnable matcher and the plug-in hooks.

    `forward` encodes the query once and all B*K supports in the same backbone pass, then calls `match`, which a
    method implements, and returns per-shot logits [B,K,2,H,W] at image resolution. `predict` aggregates the K
    shots (HSNet vote by default) into a binary mask [B,H,W].
    """

    #: Names of the test-time settings (e.g. fine-tuning steps) a method accepts through `set_test_time`.
    test_time_options: tuple[str, ...] = ()
    #: Where a plug-in acts: 'features' (the hooks' query/support features feed the matching directly) or
    #: 'prototypes' (the method pools foreground/background prototypes and passes them through `Hooks.prototypes`).
    plugin_point: str = 'features'

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        self.hooks = Hooks()

    def set_test_time(self, **options) -> None:
        r"""Apply test-time settings (None = leave the default). A setting the method does not support is an error."""
        for name, value in options.items():
            if value is None:
                continue
            if name not in self.test_time_options:
                raise UserError(f'--{name.replace("_", "-")} is not supported by {type(self).__name__} '
                                f'(supported: {", ".join(self.test_time_options) or "none"})')
            setattr(self, name, value)

    def attach(self, hooks: Hooks) -> 'FewShotSegmenter':
        self.hooks = hooks
        return self

    @property
    def feature_channels(self) -> list[int]:
        r"""Width of each feature tap the hooks see (a plug-in sizes its projections from this)."""
        return list(self.backbone.channels)

    @property
    def feature_levels(self) -> list[int]:
        r"""Level id of each feature tap (taps of one level share a plug-in's per-level modules)."""
        return list(self.backbone.stage_ids)

    def extract(self, query_img: torch.Tensor, support_imgs: torch.Tensor):
        r"""One backbone pass over the B queries and B*K supports. Returns (query taps [B], support taps [B*K])."""
        b = query_img.shape[0]
        feats = self.backbone(torch.cat([query_img, support_imgs.flatten(0, 1)]))
        return [f[:b] for f in feats], [f[b:] for f in feats]

    def forward(self, query_img: torch.Tensor, support_imgs: torch.Tensor, support_masks: torch.Tensor,
                class_id: torch.Tensor) -> torch.Tensor:
        r"""query_img [B,3,H,W], support_imgs [B,K,3,H,W], support_masks [B,K,H,W] -> logits [B,K,2,H,W]."""
        b, k = support_imgs.shape[:2]
        ctx = EpisodeContext(class_id=class_id, nshot=k, support_masks=support_masks.flatten(0, 1).float())
        query_feats, support_feats = self.extract(query_img, support_imgs)
        query_feats = self.hooks.query_features(query_feats, ctx)
        support_feats = self.hooks.support_features(support_feats, ctx)
        logits = self.match(query_feats, support_feats, ctx)                       # [B*K,2,h,w]
        logits = F.interpolate(logits, query_img.shape[-2:], mode='bilinear', align_corners=True)
        return logits.view(b, k, *logits.shape[1:])

    def match(self, query_feats: list[torch.Tensor], support_feats: list[torch.Tensor],
              ctx: EpisodeContext) -> torch.Tensor:
        r"""Query taps [B] and support taps [B*K] -> per-shot 2-class logits [B*K,2,h,w]."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        r"""2-class cross-entropy averaged over pixels and shots; pixels labelled 255 are ignored."""
        b, k = logits.shape[:2]
        target = query_mask.long().unsqueeze(1).expand(b, k, *query_mask.shape[1:])
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1), ignore_index=IGNORE_INDEX)

    def episode_logits(self, query_img: torch.Tensor, support_imgs: torch.Tensor, support_masks: torch.Tensor,
                       class_id: torch.Tensor) -> torch.Tensor:
        r"""Test-time per-shot logits [B,K,2,H,W]. Methods with test-time adaptation override this: adapt on the
        episode's supports (under `torch.enable_grad()`), predict, and restore their weights before returning, so
        that no state carries over to the next episode."""
        return self(query_img, support_imgs, support_masks, class_id)

    @torch.no_grad()
    def predict(self, query_img: torch.Tensor, support_imgs: torch.Tensor, support_masks: torch.Tensor,
                class_id: torch.Tensor) -> torch.Tensor:
        r"""Binary query mask [B,H,W] (int64) from K shots."""
        return self.aggregate(self.episode_logits(query_img, support_imgs, support_masks, class_id))

    @staticmethod
    def aggregate(logits: torch.Tensor) -> torch.Tensor:
        r"""HSNet's K-shot vote: sum the per-shot argmax masks, divide by max(max vote, 1), threshold at 0.5."""
        votes = logits.argmax(dim=2).sum(dim=1)                                    # [B,H,W]
        max_vote = votes.flatten(1).max(dim=1).values.clamp(min=1).view(-1, 1, 1)
        return (votes.float() / max_vote >= 0.5).long()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
