r"""The method interface: one staged episode pipeline, K-shot policies, named losses, options and training recipe.

Every method runs the same stages (written once, here):

    record = method.encode(query_img, support_imgs, support_masks, class_id)    # backbone once + plug-in feature hooks
    output = method.match(record)                                               # the method's own matching
    mask   = method.segment(output)                                             # its K-shot policy

`forward` is encode + match (training); `infer(record)` is the one test-time entry point, which runs the method's
test-time adaptation (model/adapt.py) when it has one; `infer_episode(images...)` is infer(encode(...)) (streaming
the shots of a shot-by-shot K-shot vote, see there) and `predict` = segment(infer_episode(...)). A method subclasses
`FewShotSegmenter`, implements `match` and declares, as class attributes: its `kshot` policy, its `Options`
dataclass (which become command-line flags), its `backbone_spec`, its `plugin_point`, and optionally its loss terms,
training recipe (`configure_optimizers`) and test-time adaptation (`adaptation_parameters` / `adaptation_loss`).
"""
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.constants import IGNORE_INDEX
from common.errors import UserError
from model.adapt import adapt_and_match
from model.backbone import Backbone, BackboneSpec
from model.records import Adaptation, EpisodeContext, EpisodeRecord, Output, Recipe, SupportSet  # noqa: F401


# --- K-shot policies ----------------------------------------------------------------------------------------------
class KShotPolicy:
    r"""How K shots become one prediction. Prediction, loss and metrics all go through the method's policy."""
    name = ''

    @staticmethod
    def segment(logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def per_prediction(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""(logits [N,2,H,W], target [N,H,W]) pairs for a pixel loss: one per shot ('vote') or per episode."""
        raise NotImplementedError


class Vote(KShotPolicy):
    r"""HSNet's K-shot vote over per-shot predictions [B,K,2,H,W]: sum the K argmax masks, divide by
    max(max vote, 1), threshold at 0.5. Training loss: each shot's prediction against the query mask."""
    name = 'vote'

    @staticmethod
    def segment(logits: torch.Tensor) -> torch.Tensor:
        votes = logits.argmax(dim=2).sum(dim=1)                                    # [B,H,W]
        max_vote = votes.flatten(1).max(dim=1).values.clamp(min=1).view(-1, 1, 1)
        return (votes.float() / max_vote >= 0.5).long()

    @staticmethod
    def per_prediction(logits, target):
        b, k = logits.shape[:2]
        return logits.flatten(0, 1), target.unsqueeze(1).expand(b, k, *target.shape[1:]).flatten(0, 1)


class Joint(KShotPolicy):
    r"""One prediction [B,2,H,W] from all K supports together (PMMs' joint EM, averaged prototypes): argmax."""
    name = 'joint'

    @staticmethod
    def segment(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=1)

    @staticmethod
    def per_prediction(logits, target):
        return logits, target


KSHOT_POLICIES: dict[str, type[KShotPolicy]] = {'vote': Vote, 'joint': Joint}


# --- options and recipe -------------------------------------------------------------------------------------------
def option(default, help: str, choices: tuple | None = None, low: float | None = None, high: float | None = None):
    r"""A method option: becomes the flag `--<name>` of train.py (with help, choices, and an inclusive range check),
    is saved in the checkpoint and rebuilt by test.py."""
    return field(default=default, metadata={'help': help, 'choices': choices, 'low': low, 'high': high})


@dataclass
class NoOptions:
    r"""A method without options."""


def validate_options(options, method: str):
    r"""Check every field of an options dataclass against its choices and range; a clear error names the flag."""
    for f in dataclasses.fields(options):
        value, meta = getattr(options, f.name), f.metadata
        flag = '--' + f.name.replace('_', '-')
        if meta.get('choices') and value not in meta['choices']:
            raise UserError(f'{flag} {value!r} is not an option of {method}; choose one of '
                            f'{", ".join(map(str, meta["choices"]))}')
        if isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
                raise UserError(f'{flag} of {method} must be a number, got {value!r}')
            if isinstance(f.default, int) and value != int(value):
                raise UserError(f'{flag} of {method} must be an integer, got {value!r}')
            low, high = meta.get('low'), meta.get('high')
            if (low is not None and value < low) or (high is not None and value > high):
                rng = f'[{"-inf" if low is None else low}, {"inf" if high is None else high}]'
                raise UserError(f'{flag} of {method} must lie in {rng}, got {value!r}')
    return options


# --- hooks --------------------------------------------------------------------------------------------------------
class Hooks(nn.Module):
    r"""Identity plug-in. A plug-in (e.g. CD-TG) subclasses this and is attached with `method.attach(plugin)`.

    `encode` calls `query_features` and `support_features` on the backbone taps; methods with prototypes call
    `prototypes` on them before using them. A plug-in sizes its modules from the host's `feature_channels` /
    `feature_levels`, which describe the maps passed to `prototypes` (prototype hosts) or the taps (feature hosts).
    Its parameters train in optimiser groups it defines (`optimizer_groups`), which every host's recipe adds; the
    training loop can ask it for health readings (`probing`, `readings`, `check_health`).
    """

    #: True during the training forwards whose health the loop reads (every --log-every steps).
    probing: bool = False

    def optimizer_groups(self, host_lr: float, adaptive: bool) -> list[dict]:
        r"""Optimiser parameter groups of the plug-in's trainable parameters, given the host's base learning rate and
        whether its optimizer is adaptive (Adam) or SGD. Keys besides torch's: 'max_grad_norm' (a gradient-norm clip
        of the group's own, engine/loops.py) and 'name'. Default: one group with the host optimizer's defaults."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{'params': params, 'name': 'plugin'}] if params else []

    def readings(self) -> dict:
        r"""Health readings of the forwards run while `probing` was on, since the last call (none by default)."""
        return {}

    def check_health(self, readings: dict, step: int) -> list[str]:
        r"""Warnings about a run's health from its readings at training step `step` (none by default)."""
        return []

    def bind(self, benchmark: str, class_names: list[str]) -> None:
        r"""Called before running episodes of `benchmark`, whose `class_id`s index `class_names`."""

    def query_features(self, feats: list[torch.Tensor], ctx: EpisodeContext) -> list[torch.Tensor]:
        r"""feats: per tap [B,C_l,h_l,w_l] (query encoded once for all K shots)."""
        return feats

    def support_features(self, feats: list[torch.Tensor], ctx: EpisodeContext) -> list[torch.Tensor]:
        r"""feats: per tap [B*K,C_l,h_l,w_l], before any masking. Per image: a support's output may depend on that
        support and its mask only, not on the other shots (`infer_episode` may pass one shot at a time)."""
        return feats

    def prototypes(self, fg: list[torch.Tensor], bg: list[torch.Tensor | None], feats: list[torch.Tensor],
                   ctx: EpisodeContext) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        r"""Prototype sets per level: fg, bg [N,P,C_l] with P >= 1 prototypes per set (PMMs: mixture components)
        and N = B*K (one set per support) or N = B (sets already averaged over the K shots); a host without
        background prototypes passes None for bg. feats: the support maps [B*K,C_l,h,w] they were pooled from
        (unmasked). Returns the (possibly fused) sets, same shapes."""
        return fg, bg


# --- the method base ----------------------------------------------------------------------------------------------
#: Where a method lets a plug-in act: on the features its matching reads, or on its prototypes.
PLUGIN_POINTS = ('features', 'prototypes')


class FewShotSegmenter(nn.Module):
    r"""Base class: a backbone (frozen unless the spec fine-tunes it), a learnable matcher and the plug-in hooks.

    Class attributes a method declares:
        kshot (required): 'vote' or 'joint' (see `Vote`, `Joint`).
        Options: a dataclass of the method's options (`option(...)` fields); NoOptions by default.
        backbone_spec: the `BackboneSpec` it needs (taps, dilation, trainable layers, geometry); a method whose options
            change it overrides `spec_for`.
        train_recipe: train.py defaults of its public code where they differ from `common.constants.TRAIN_DEFAULTS`
            (img_size, bsz, epochs, train_boundary; a 'kshot' dict overrides them for K > 1); a flag or YAML key the
            user gives wins. A literal (train.py reads it without importing torch; `model.train_recipe`).
        legacy_options: values of options added after checkpoints were written with the behaviour they now switch
            (a checkpoint without the option gets this value, not the new default; `stored_options`).
        default_backbone: the backbone used when train.py's --backbone is not given.
        plugin_point (required): 'features' (the hooks' query/support features feed the matching) or 'prototypes'
            (a plug-in fuses its prototypes with the method's).
        adaptation_defaults: its test-time adaptation settings (`Adaptation(steps=0)` = none by default); a method
            that adapts overrides `adaptation_parameters` and `adaptation_loss`.
        default_lr: the base learning rate of its recipe.
        separate_bn_batches: in training with moving BatchNorm statistics, encode the supports and then the queries
            in two backbone passes (each normalised with its own batch statistics, as a public code that extracts
            them separately); False: one pass over both.
    """

    kshot: str                      # required: 'vote' or 'joint'
    Options: type = NoOptions
    backbone_spec: BackboneSpec = BackboneSpec()
    train_recipe: dict = {}
    legacy_options: dict = {}
    default_backbone: str = 'resnet50'
    plugin_point: str               # required: 'features' or 'prototypes'
    adaptation_defaults: Adaptation = Adaptation()
    default_lr: float = 1e-3
    separate_bn_batches: bool = False
    #: Test time, 'vote' methods with K > 1: match the shots one at a time ('one': the same predictions at a
    #: fraction of the peak memory, and faster on CPU; `infer_episode` then also encodes each support just before
    #: its match), all K in one batch after one backbone pass ('all'), or 'auto' = one on CPU, all on CUDA (set by
    #: test.py --match-shots; scripts/bench.py measures both).
    match_shots: str = 'auto'

    def __init__(self, backbone: Backbone, options=None):
        super().__init__()
        self.backbone = backbone
        self.options = validate_options(options if options is not None else self.Options(), type(self).__name__)
        self.hooks = Hooks()
        self.adaptation = Adaptation(**dataclasses.asdict(self.adaptation_defaults))
        for name, allowed in (('kshot', tuple(KSHOT_POLICIES)), ('plugin_point', PLUGIN_POINTS)):
            if getattr(type(self), name, None) not in allowed:
                raise TypeError(f'method {type(self).__name__} must declare {name} as one of {", ".join(allowed)} '
                                f'(a class attribute; got {getattr(type(self), name, None)!r}); see docs/methods.md, '
                                '"Adding a method"')
        self.policy = KSHOT_POLICIES[self.kshot]

    @classmethod
    def spec_for(cls, options) -> BackboneSpec:
        r"""The backbone spec under these options (`backbone_spec` unless an option changes the geometry)."""
        return cls.backbone_spec

    # --- plug-in ----------------------------------------------------------------------------------------------
    def attach(self, hooks: Hooks) -> 'FewShotSegmenter':
        self.hooks = hooks
        return self

    @property
    def feature_channels(self) -> list[int]:
        r"""Width of each map the hooks see (a plug-in sizes its projections from this)."""
        return list(self.backbone.channels)

    @property
    def feature_levels(self) -> list[int]:
        r"""Level id of each map (maps of one level share a plug-in's per-level modules)."""
        return list(self.backbone.stage_ids)

    # --- the pipeline -----------------------------------------------------------------------------------------
    def encode(self, query_img: torch.Tensor, support_imgs: torch.Tensor, support_masks: torch.Tensor,
               class_id: torch.Tensor) -> EpisodeRecord:
        r"""One backbone pass over the B queries and B*K supports (query once for all K shots), then the hooks
        (`separate_bn_batches` in training with moving BatchNorm: the supports' pass, then the queries').
        query_img [B,3,H,W], support_imgs [B,K,3,H,W], support_masks [B,K,H,W]."""
        if self.separate_bn_batches and self.training and self.backbone.moving_batchnorms():
            support_feats = self.backbone(support_imgs.flatten(0, 1))
            return self._record(query_img, self.backbone(query_img), support_imgs, support_masks, class_id,
                                support_feats)
        b = query_img.shape[0]
        feats = self.backbone(torch.cat([query_img, support_imgs.flatten(0, 1)]))
        return self._record(query_img, [f[:b] for f in feats], support_imgs, support_masks, class_id,
                            [f[b:] for f in feats])

    def encode_supports(self, support_imgs: torch.Tensor, support_masks: torch.Tensor,
                        class_id: torch.Tensor) -> SupportSet:
        r"""Encode support sets once, to serve many queries through `encode_query`."""
        masks = support_masks.float()
        ctx = EpisodeContext(class_id, support_imgs.shape[1], masks.flatten(0, 1))
        feats = self.hooks.support_features(self.backbone(support_imgs.flatten(0, 1)), ctx)
        return SupportSet(support_imgs, masks, feats, class_id)

    def encode_query(self, query_img: torch.Tensor, supports: SupportSet) -> EpisodeRecord:
        r"""Encode B queries against already encoded support sets (one per query)."""
        ctx = supports.context()
        return EpisodeRecord(query_img, self.hooks.query_features(self.backbone(query_img), ctx), supports, ctx)

    def _record(self, query_img, query_feats, support_imgs, support_masks, class_id, support_feats) -> EpisodeRecord:
        masks = support_masks.float()
        ctx = EpisodeContext(class_id=class_id, nshot=support_imgs.shape[1], support_masks=masks.flatten(0, 1))
        query_feats = self.hooks.query_features(query_feats, ctx)
        support_feats = self.hooks.support_features(support_feats, ctx)
        return EpisodeRecord(query_img, query_feats, SupportSet(support_imgs, masks, support_feats, class_id), ctx)

    def match(self, record: EpisodeRecord) -> Output:
        r"""The method's matching: an encoded episode record -> `Output` (logits shaped by the K-shot policy)."""
        raise NotImplementedError

    def forward(self, query_img: torch.Tensor, support_imgs: torch.Tensor, support_masks: torch.Tensor,
                class_id: torch.Tensor) -> Output:
        r"""encode + match: the training forward (no test-time adaptation)."""
        return self.match(self.encode(query_img, support_imgs, support_masks, class_id))

    def infer(self, record: EpisodeRecord) -> Output:
        r"""The test-time entry point every caller uses (evaluation loops, the volumetric protocol, predict.py,
        benchmarks): with test-time adaptation enabled it adapts on each episode's supports and restores every
        weight afterwards (model/adapt.py); otherwise it is `match`."""
        if self.adaptation.steps > 0:
            return adapt_and_match(self, record)
        return self.match_episode(record)

    def infer_episode(self, query_img: torch.Tensor, support_imgs: torch.Tensor, support_masks: torch.Tensor,
                      class_id: torch.Tensor) -> Output:
        r"""`infer(encode(...))` from the images: what the evaluation loops, `predict` and the benchmarks call.

        A 'vote' method matching shot by shot (`match_shots`) without test-time adaptation streams the shots: the
        query is encoded once, then each support is encoded just before its own match and dropped after it, so the
        episode holds the features of the query and one support instead of all K (HSNet, 5-shot, 400x400, CPU: a
        peak of 1.27 GB against about 3 GB with the K shots in one batch, as much as the public code's per-shot
        forwards). The logits are those of `infer(encode(...))` up to float rounding (backbone batches of one image
        instead of 1 + K); the support hook sees one shot at a time, which the hook contract allows
        (`Hooks.support_features` is per image).
        """
        k = support_imgs.shape[1]
        if self.adaptation.steps > 0 or not self._shot_by_shot(k, query_img.device):
            return self.infer(self.encode(query_img, support_imgs, support_masks, class_id))
        masks = support_masks.float()
        query_ctx = EpisodeContext(class_id, k, masks.flatten(0, 1))
        query_feats = self.hooks.query_features(self.backbone(query_img), query_ctx)
        logits = []
        for s in range(k):
            supports = self.encode_supports(support_imgs[:, s:s + 1], masks[:, s:s + 1], class_id)
            logits.append(self.match(EpisodeRecord(query_img, query_feats, supports, supports.context())).logits)
            del supports                                       # this support's features go before the next one's
        return Output(torch.cat(logits, dim=1))

    def match_episode(self, record: EpisodeRecord) -> Output:
        r"""`match`, shot by shot for the 'vote' policy when `match_shots` says so (see there)."""
        if not self._shot_by_shot(record.nshot, record.query_img.device):
            return self.match(record)
        return Output(torch.cat([self.match(record.shot(k)).logits for k in range(record.nshot)], dim=1))

    def _shot_by_shot(self, nshot: int, device: torch.device) -> bool:
        mode = self.match_shots
        if mode == 'auto':
            mode = 'all' if device.type == 'cuda' else 'one'
        return self.kshot == 'vote' and nshot > 1 and mode == 'one'

    def segment(self, output: Output) -> torch.Tensor:
        r"""Binary query mask [B,H,W] (int64) by the method's K-shot policy."""
        return self.policy.segment(output.logits)

    @torch.no_grad()
    def predict(self, query_img: torch.Tensor, support_imgs: torch.Tensor, support_masks: torch.Tensor,
                class_id: torch.Tensor) -> torch.Tensor:
        r"""Binary query mask [B,H,W] from K shots, through `infer_episode`."""
        return self.segment(self.infer_episode(query_img, support_imgs, support_masks, class_id))

    @staticmethod
    def upsample(logits: torch.Tensor, record: EpisodeRecord) -> torch.Tensor:
        r"""[N,C,h,w] -> [N,C,H,W] at the episode's image size (bilinear, aligned corners, as HSNet)."""
        return F.interpolate(logits, record.image_size, mode='bilinear', align_corners=True)

    def per_shot(self, logits: torch.Tensor, record: EpisodeRecord) -> torch.Tensor:
        r"""Per-shot logits [B*K,2,h,w] -> the 'vote' policy's [B,K,2,H,W] at image resolution."""
        logits = self.upsample(logits, record)
        return logits.view(record.batch, record.nshot, *logits.shape[1:])

    # --- training ---------------------------------------------------------------------------------------------
    def loss(self, output: Output, batch: dict) -> dict[str, torch.Tensor]:
        r"""Named loss terms, already weighted: the training step minimises their sum, each is logged. Default: the
        policy's 2-class cross-entropy against batch['query_mask'] (pixels labelled 255 are ignored)."""
        return {'ce': self.cross_entropy(output.logits, batch['query_mask'])}

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None):
        r"""Pixel cross-entropy of the policy's predictions (per shot for 'vote') against target [B,H,W]."""
        logits, target = self.policy.per_prediction(logits, target.long())
        return F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE_INDEX)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def host_parameters(self) -> list[nn.Parameter]:
        r"""The trainable parameters of the method itself, without the plug-in's (which train in its own groups)."""
        plugin = {id(p) for p in self.hooks.parameters()}
        return [p for p in self.trainable_parameters() if id(p) not in plugin]

    def param_groups(self, host_groups: list[dict], lr: float, adaptive: bool) -> list[dict]:
        r"""A recipe's optimizer groups: the method's own (over `host_parameters`), then the plug-in's
        (`Hooks.optimizer_groups`, given the recipe's base learning rate `lr` and whether its optimizer is `adaptive`
        (Adam) or SGD). Every recipe builds its optimizer from this, so a plug-in trains by its own settings under
        any host's optimizer and schedule."""
        return [g for g in host_groups if g['params']] + self.hooks.optimizer_groups(lr, adaptive)

    def configure_optimizers(self, lr: float | None = None, total_steps: int = 1) -> Recipe:
        r"""The paper's training recipe. Default (HSNet, PATNet): Adam over the method's trainable parameters,
        constant LR (`default_lr` unless `lr` is given), plus the plug-in's own group."""
        lr = lr or self.default_lr
        return Recipe(torch.optim.Adam(self.param_groups([{'params': self.host_parameters()}], lr, adaptive=True),
                                       lr=lr))

    # --- test-time adaptation ---------------------------------------------------------------------------------
    def set_test_time(self, finetune_steps: int | None = None, finetune_lr: float | None = None) -> None:
        r"""Test-time adaptation settings (None = the method's default). Steps > 0 on a method without test-time
        adaptation is an error."""
        if finetune_steps is not None:
            if isinstance(finetune_steps, bool) or int(finetune_steps) != finetune_steps or finetune_steps < 0:
                raise UserError(f'--finetune-steps must be an integer >= 0, got {finetune_steps}')
            if finetune_steps > 0 and not self.adapts():
                raise UserError(f'--finetune-steps: {type(self).__name__} has no test-time adaptation')
            self.adaptation.steps = int(finetune_steps)
        if finetune_lr is not None:
            if not finetune_lr > 0 or finetune_lr == float('inf'):
                raise UserError(f'--finetune-lr must be a finite number > 0, got {finetune_lr}')
            if not self.adapts():
                raise UserError(f'--finetune-lr: {type(self).__name__} has no test-time adaptation')
            self.adaptation.lr = float(finetune_lr)

    @classmethod
    def adapts(cls) -> bool:
        r"""Whether the method implements test-time adaptation."""
        return cls.adaptation_loss is not FewShotSegmenter.adaptation_loss

    def adaptation_parameters(self, record: EpisodeRecord) -> list[torch.Tensor]:
        r"""The leaf tensors test-time adaptation optimises for this episode: parameters of the model (restored bit
        for bit afterwards) and/or tensors the method puts into `record.state` (discarded with the record)."""
        raise NotImplementedError

    def adaptation_loss(self, record: EpisodeRecord, step: int) -> torch.Tensor:
        r"""The objective of one adaptation step on one episode (B = 1), from its supports (and, for transductive
        methods, the unlabelled query) only: never the query's label."""
        raise NotImplementedError

    def adaptation_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        r"""A fresh optimizer per episode (default Adam at `adaptation.lr`)."""
        return torch.optim.Adam(params, lr=self.adaptation.lr)
