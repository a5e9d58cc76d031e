r"""ImageNet backbones that return a method's feature taps in one pass: frozen, or fine-tuned from some layer on."""
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torchvision import models

from common.checkpoint import strip_prefixes
from common.errors import UserError
from model import BACKBONE_SPECS, BACKBONES  # noqa: F401  (BACKBONES re-exported)
from model.layers.conv import conv2d

# name -> (torchvision constructor, ImageNet weights (None: no torchvision download), bottlenecks per layer1..4 for
# ResNets), from the torch-free declaration in model/__init__.py.
_SPECS = {name: (getattr(models, ctor), getattr(models, enum).IMAGENET1K_V1 if enum else None,
                 list(blocks) if blocks else None) for name, (ctor, enum, blocks) in BACKBONE_SPECS.items()}

# VGG-16 taps as in HSNet: conv4_1..4_3 and conv5_1..5_3 before their ReLU, and pool5.
_VGG_TAPS = {17: 2, 19: 2, 21: 2, 24: 3, 26: 3, 28: 3, 30: 4}
RESNET_LAYERS = ('layer1', 'layer2', 'layer3', 'layer4')
_WIDTHS = {1: 256, 2: 512, 3: 1024, 4: 2048}


@dataclass(frozen=True)
class BackboneSpec:
    r"""What a method needs from its backbone (declared on the method class, see `FewShotSegmenter.backbone_spec`).

    Attributes:
        taps: 'bottlenecks' (HSNet family: every bottleneck of layer2-4 after the residual add and before its final
            ReLU; ResNet-50: 4 x 512 @ /8, 6 x 1024 @ /16, 3 x 2048 @ /32; VGG-16: HSNet's 7 conv taps), or a tuple of
            ResNet layer names ('layer1'..'layer4') whose outputs are returned, in that order.
        tap_relu: for layer taps, whether the layer's last ReLU is applied (False: IFA's layer3 without it).
        dilate: for layer2, layer3, layer4: replace the stride by dilation (torchvision's
            `replace_stride_with_dilation`); (False, True, True) gives output stride 8 (DeepLab / PMMs / Q-Net).
        trainable: ResNet parts fine-tuned with the method ('stem', 'layer1'..'layer4', 'fc'); their BatchNorm
            layers stay frozen (running statistics and affine parameters). Everything else is frozen and runs
            without gradient.
        keep_fc: keep the classifier `net.fc` (Q-Net derives its threshold from its 1000 outputs). Weight files never
            load it: it keeps its random initialisation, as in Q-Net, whose DeepLabv3 weights have no fc.
        stride_on_conv1: a strided bottleneck strides in its first 1x1 conv (ResNet v1, Caffe and DeepLab-v2 code such
            as PMMs' `resnet_dialated.py`), not in its 3x3 conv (torchvision's v1.5).
        ceil_pool: the stem's max-pool rounds its output size up (`ceil_mode`; PMMs' backbone). Changes the map size
            where (H + 1) / 2 is odd: 400 -> 200 -> 101 instead of 100.
        dilate_first: the first bottleneck of a dilated layer has the layer's dilation too (DeepLab-v2 code: layer3
            all 2); torchvision gives it the previous layer's (layer3's first block 1).
        bn: BatchNorm of the trainable parts: 'frozen' (ImageNet statistics and affine parameters kept), 'batch'
            (in training, batch statistics normalise and update the running ones, affine frozen: PMMs' reference),
            'trained' (the same, and the affine parameters learn: Q-Net's reference). Frozen parts stay frozen.
    The three geometry switches change no weight: torchvision's ImageNet tensors load into either geometry.
    """
    taps: str | tuple[str, ...] = 'bottlenecks'
    tap_relu: bool = True
    dilate: tuple[bool, bool, bool] = (False, False, False)
    trainable: tuple[str, ...] = ()
    keep_fc: bool = False
    stride_on_conv1: bool = False
    ceil_pool: bool = False
    dilate_first: bool = False
    bn: str = 'frozen'

    def validate(self, name: str) -> 'BackboneSpec':
        parts = ('stem',) + RESNET_LAYERS + ('fc',)
        if self.taps != 'bottlenecks':
            if not self.taps or any(t not in RESNET_LAYERS for t in self.taps):
                raise UserError(f'backbone taps {self.taps!r}: use "bottlenecks" or ResNet layer names {RESNET_LAYERS}')
        if any(t not in parts for t in self.trainable):
            raise UserError(f'trainable backbone parts {self.trainable!r}: choose from {parts}')
        if 'fc' in self.trainable and not self.keep_fc:
            raise UserError('a trainable fc needs keep_fc=True')
        if self.bn not in ('frozen', 'batch', 'trained'):
            raise UserError(f'backbone BatchNorm mode {self.bn!r}: choose frozen, batch or trained')
        if name == 'vgg16' and (self.taps != 'bottlenecks' or any(self.dilate) or self.trainable or self.keep_fc
                                or self.geometry != 'torchvision'):
            raise UserError('vgg16 supports only the frozen HSNet taps; this method needs a ResNet backbone '
                            '(--backbone resnet50 or resnet101)')
        return self

    @property
    def geometry(self) -> str:
        r"""'torchvision' (v1.5), 'deeplab-v2' (all three switches on, PMMs' backbone) or the switches that are on."""
        on = [n for n in ('stride_on_conv1', 'ceil_pool', 'dilate_first') if getattr(self, n)]
        return 'torchvision' if not on else 'deeplab-v2' if len(on) == 3 else '+'.join(on)

    @property
    def last_layer(self) -> int:
        r"""Index (1-4) of the deepest ResNet layer the taps need (later layers are not run)."""
        if self.taps == 'bottlenecks':
            return 4
        return max(RESNET_LAYERS.index(t) for t in self.taps) + 1


class Backbone(nn.Module):
    r"""ImageNet feature extractor; frozen (BN in eval mode, no gradients) unless the spec fine-tunes some layers.

    With the default spec ResNets return every bottleneck output of layer2-4 after the residual add and before the
    final ReLU (ResNet-50: 4 x 512 @ /8, 6 x 1024 @ /16, 3 x 2048 @ /32). `stage_ids[i]` is the stage (2, 3, 4) of
    tap i and `channels[i]` its width.

    Args:
        name: resnet50 | resnet101 | vgg16.
        weights: 'imagenet' (torchvision download, cached in $TORCH_HOME), a path to a local .pth state dict,
            'none' (random initialisation, with a loud warning; only for tests and the offline demo), or None when
            the weights will be loaded from a checkpoint right after construction.
        spec: which taps, dilation and trainable layers (a method's `backbone_spec`).
    """

    def __init__(self, name: str = 'resnet50', weights: str | None = 'imagenet', spec: BackboneSpec | None = None):
        super().__init__()
        if name not in _SPECS:
            raise UserError(f'unknown backbone {name!r}; choose one of {", ".join(BACKBONES)}')
        self.spec = (spec or BackboneSpec()).validate(name)
        build, enum, blocks = _SPECS[name]
        self.name = name
        self.weights = str(weights)
        self.net = build(weights=None) if blocks is None else build(weights=None,
                                                                     replace_stride_with_dilation=list(self.spec.dilate))
        if name.endswith('-deep'):
            _deep_stem(self.net)
        if blocks is not None:
            _set_geometry(self.net, self.spec)
        if weights is not None:
            _load_weights(self.net, name, enum, str(weights))
        if blocks is None:
            self.stage_ids = list(_VGG_TAPS.values())
            self.channels = [512] * len(_VGG_TAPS)
            del self.net.avgpool, self.net.classifier
        else:
            if self.spec.taps == 'bottlenecks':
                self.stage_ids = [stage + 1 for stage, n in enumerate(blocks) for _ in range(n)][blocks[0]:]
            else:
                self.stage_ids = [RESNET_LAYERS.index(t) + 1 for t in self.spec.taps]
            self.channels = [_WIDTHS[s] for s in self.stage_ids]
            for layer in RESNET_LAYERS[self.spec.last_layer:]:           # layers no tap needs are never run
                delattr(self.net, layer)
            if not self.spec.keep_fc:
                del self.net.fc
        self.requires_grad_(False)
        for part in self.spec.trainable:
            for module in self._part_modules(part):
                for sub in module.modules():
                    if not isinstance(sub, nn.BatchNorm2d) or self.spec.bn == 'trained':
                        for param in sub.parameters(recurse=False):
                            param.requires_grad_(True)
        # NHWC convolutions: 22% faster ResNet-50 forward on a 2-core CPU; the preferred layout on tensor cores too.
        self.net.to(memory_format=torch.channels_last)
        self.eval()

    def _part_modules(self, part: str) -> list[nn.Module]:
        net = self.net
        if part == 'stem':
            return [net.conv1, net.bn1]
        return [getattr(net, part)] if hasattr(net, part) else []

    @property
    def trainable(self) -> bool:
        return bool(self.spec.trainable)

    @property
    def stage_sizes(self) -> list[int]:
        r"""Number of taps per stage, deepest stage first (the HPN learner's input channels)."""
        return [self.stage_ids.count(s) for s in (4, 3, 2)]

    def train(self, mode: bool = True):
        # BN keeps its ImageNet statistics whatever the surrounding model does, unless the spec's bn mode lets the
        # trainable parts' BN use (and update) batch statistics in training.
        super().train(False)
        if mode and self.spec.bn != 'frozen':
            for bn in self.moving_batchnorms():
                bn.train(True)
        return self

    def moving_batchnorms(self) -> list[nn.BatchNorm2d]:
        r"""The BatchNorm layers whose statistics move in training (trainable parts, bn mode batch/trained)."""
        if self.spec.bn == 'frozen':
            return []
        return [m for part in self.spec.trainable for module in self._part_modules(part) for m in module.modules()
                if isinstance(m, nn.BatchNorm2d)]

    def moving_buffers(self) -> list[str]:
        r"""Names (in this module) of the buffers that training changes: `moving_batchnorms`' running statistics."""
        moving = {id(m) for m in self.moving_batchnorms()}
        return [f'{name}.{b}' for name, m in self.named_modules() if id(m) in moving
                for b, _ in m.named_buffers(recurse=False)]

    @torch.no_grad()
    def calibrate_bn(self, batches) -> int:
        r"""Re-estimate every BatchNorm's running mean/variance (cumulative average) on the given image batches;
        no weight changes. Returns the number of images seen.

        Used to make a randomly initialised backbone usable (its BN statistics are 0/1, which lets activations
        drift through 16 bottlenecks until every pixel looks alike); call it with *source* training images only.
        """
        bns = [m for m in self.net.modules() if isinstance(m, nn.BatchNorm2d)]
        if not bns:
            raise UserError(f'backbone {self.name} has no BatchNorm layers to calibrate')
        saved = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.training = True
        seen = 0
        try:
            for images in batches:
                self._forward_resnet(images.contiguous(memory_format=torch.channels_last), fold=False)
                seen += images.shape[0]
        finally:
            for m, momentum in zip(bns, saved):
                m.momentum = momentum
                m.training = False
        return seen

    def forward(self, img: torch.Tensor) -> list[torch.Tensor]:
        r"""img [N,3,H,W] -> the taps (channels-last maps). Frozen parts run without gradient; gradients flow from
        the first trainable part on (also through frozen layers after it)."""
        img = img.contiguous(memory_format=torch.channels_last)
        if self.name == 'vgg16':
            with torch.no_grad():
                return self._forward_vgg(img)
        return self._forward_resnet(img)

    def _layers(self) -> list[tuple[int, nn.Module]]:
        return [(i, getattr(self.net, n)) for i, n in enumerate(RESNET_LAYERS, start=1) if hasattr(self.net, n)]

    def _conv_bn_pairs(self, inference: bool = False):
        r"""The (conv, BN) pairs whose BN is folded into the conv: those of the frozen parts (their weights never
        move) and, in an inference forward (`inference`: no gradient recorded), those of the trainable parts whose BN
        normalises with its running statistics (a moving BN in training mode keeps conv -> BN)."""
        def foldable(part: str, pairs: list) -> list:
            if part not in self.spec.trainable:
                return pairs
            return [(conv, bn) for conv, bn in pairs if inference and not bn.training]

        pairs = foldable('stem', self._stem_pairs())
        for stage, layer in self._layers():
            layer_pairs = []
            for block in layer:
                layer_pairs += [(block.conv1, block.bn1), (block.conv2, block.bn2), (block.conv3, block.bn3)]
                if block.downsample is not None:
                    layer_pairs.append((block.downsample[0], block.downsample[1]))
            pairs += foldable(RESNET_LAYERS[stage - 1], layer_pairs)
        return pairs

    def _stem_pairs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        r"""The stem's (conv, BN) pairs, each followed by a ReLU: torchvision's 7x7 conv, or the deep stem's three."""
        net = self.net
        if isinstance(net.conv1, nn.Sequential):
            return [(net.conv1[0], net.conv1[1]), (net.conv1[3], net.conv1[4]), (net.conv1[6], net.bn1)]
        return [(net.conv1, net.bn1)]

    def _fold_batchnorm(self, inference: bool = False) -> dict:
        r"""Conv weights with their BatchNorm folded in (w·γ/σ, β - μγ/σ; the pairs of `_conv_bn_pairs`): one pass
        per conv instead of two, about 10% of the forward. Computed afresh for every forward (a few ms) rather than
        cached, so the backbone holds one copy of its weights (a cached folded copy cost ~94 MB for ResNet-50) and can
        never go stale."""
        folded = {}
        with torch.no_grad():
            for conv, bn in self._conv_bn_pairs(inference):
                scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
                weight = (conv.weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
                bias = bn.bias - bn.running_mean * scale
                if conv.bias is not None:
                    bias = bias + conv.bias * scale
                folded[conv] = (weight, bias)
        return folded

    def _forward_resnet(self, x: torch.Tensor, fold: bool = True) -> list[torch.Tensor]:
        folded = self._fold_batchnorm(inference=not torch.is_grad_enabled()) if fold else {}
        spec, net = self.spec, self.net

        def conv_bn(conv, bn, inp):
            weight, bias = folded[conv] if conv in folded else (conv.weight, conv.bias)
            out = conv2d(inp, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            return out if conv in folded else bn(out)

        def relu(x: torch.Tensor, fresh: bool = True) -> torch.Tensor:
            r"""ReLU in place on a map nothing else holds (`fresh`) while no gradient is recorded: a new map of a
            dilated ResNet at 400x400 is 10-60 MB, whose first touch (page faults) costs 10x the ReLU itself."""
            return x.relu_() if fresh and not torch.is_grad_enabled() else torch.relu(x)

        def residual(out: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
            return out.add_(identity) if not torch.is_grad_enabled() else out + identity

        grad = torch.is_grad_enabled()
        tracking = grad and 'stem' in spec.trainable          # gradients flow from the first trainable part on
        with torch.set_grad_enabled(tracking):
            for conv, bn in self._stem_pairs():
                x = relu(conv_bn(conv, bn, x))
            x = net.maxpool(x)
        feats, by_layer = [], {}
        for stage, layer in self._layers():
            name = RESNET_LAYERS[stage - 1]
            tracking = tracking or (grad and name in spec.trainable)
            with torch.set_grad_enabled(tracking):
                if spec.taps == 'bottlenecks':
                    for block in layer:
                        identity = x if block.downsample is None else conv_bn(*block.downsample, x)
                        out = relu(conv_bn(block.conv1, block.bn1, x))
                        out = relu(conv_bn(block.conv2, block.bn2, out))
                        out = residual(conv_bn(block.conv3, block.bn3, out), identity)
                        if stage > 1:
                            feats.append(out)    # taps: bottleneck outputs of layer2-4 before the final ReLU
                        x = relu(out, fresh=stage == 1)          # a tap stays as it is
                    continue
                for i, block in enumerate(layer):
                    identity = x if block.downsample is None else conv_bn(*block.downsample, x)
                    out = relu(conv_bn(block.conv1, block.bn1, x))
                    out = relu(conv_bn(block.conv2, block.bn2, out))
                    out = residual(conv_bn(block.conv3, block.bn3, out), identity)
                    x = relu(out, fresh=spec.tap_relu or i < len(layer) - 1)    # a tap before its ReLU stays
                by_layer[name] = x if spec.tap_relu else out
        return feats if spec.taps == 'bottlenecks' else [by_layer[t] for t in spec.taps]

    def _forward_vgg(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        last = max(_VGG_TAPS)
        for idx, module in enumerate(self.net.features):
            if isinstance(module, nn.ReLU):
                x = torch.relu(x)        # not in place: the previous conv output may be a tap
            else:
                x = module(x)
            if idx in _VGG_TAPS:
                feats.append(x)
            if idx == last:
                break
        return feats


def _deep_stem(net: nn.Module) -> None:
    r"""PSPNet's deep stem in place of torchvision's 7x7 conv (IFA's `model/resnet.py`): three 3x3 convs 3-64-64-128
    (the first strided), BatchNorm + ReLU after each (the last BN is `bn1`), so layer1's first block takes 128
    channels. State-dict names as the PSPNet weight files: conv1.0/1/3/4/6, bn1."""
    def conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
        layer = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        nn.init.kaiming_normal_(layer.weight, mode='fan_out', nonlinearity='relu')    # as torchvision's ResNet
        return layer

    net.conv1 = nn.Sequential(conv(3, 64, 2), nn.BatchNorm2d(64), nn.ReLU(inplace=True), conv(64, 64),
                              nn.BatchNorm2d(64), nn.ReLU(inplace=True), conv(64, 128))
    net.bn1 = nn.BatchNorm2d(128)
    first = net.layer1[0]
    first.conv1 = nn.Conv2d(128, first.conv1.out_channels, 1, bias=False)
    first.downsample[0] = nn.Conv2d(128, first.downsample[0].out_channels, 1, bias=False)
    for layer in (first.conv1, first.downsample[0]):
        nn.init.kaiming_normal_(layer.weight, mode='fan_out', nonlinearity='relu')


def _set_geometry(net: nn.Module, spec: BackboneSpec) -> None:
    r"""Move strides and dilations of a torchvision ResNet to the geometry the spec asks for (no weight changes)."""
    net.maxpool.ceil_mode = spec.ceil_pool
    for name in RESNET_LAYERS[1:]:
        first = getattr(net, name)[0]
        if spec.stride_on_conv1 and first.conv2.stride != (1, 1):
            first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)
        if spec.dilate_first and len(getattr(net, name)) > 1:
            dilation = getattr(net, name)[1].conv2.dilation       # the layer's own dilation (its later blocks')
            first.conv2.dilation = first.conv2.padding = dilation


#: Downloadable initialisations besides 'imagenet': name -> backbone -> torchvision weights enum (lazily resolved).
DOWNLOADS = {
    'deeplabv3-coco': {'resnet50': 'DeepLabV3_ResNet50_Weights', 'resnet101': 'DeepLabV3_ResNet101_Weights'},
}
WEIGHT_CHOICES = ('imagenet', *DOWNLOADS, 'none')


def _download_enum(name: str, enum, weights: str):
    r"""The torchvision weights enum of a downloadable initialisation."""
    if weights == 'imagenet':
        return enum
    if name not in DOWNLOADS[weights]:
        raise UserError(f'--backbone-weights {weights} exists for {", ".join(DOWNLOADS[weights])}, not {name}')
    from torchvision.models import segmentation
    return getattr(segmentation, DOWNLOADS[weights][name]).COCO_WITH_VOC_LABELS_V1


def _load_weights(net: nn.Module, name: str, enum, weights: str) -> None:
    if weights == 'none':
        warnings.warn(f'backbone {name} has RANDOM weights (--backbone-weights none): results mean nothing beyond '
                      'tests and the offline demo; use --backbone-weights imagenet or a .pth file', stacklevel=3)
        return
    if weights in ('imagenet', *DOWNLOADS):
        if enum is None:
            base = name.removesuffix('-deep')
            raise UserError(f'backbone {name} has no download: pass --backbone-weights /path/to/{base}.pth, the '
                            f'deep-stem ImageNet weights of PSPNet that IFA loads from ./pretrained/{base}.pth (see '
                            f'docs/datasets.md, Weights), or choose --backbone {base}')
        enum = _download_enum(name, enum, weights)
        file = Path(enum.url).name
        hub = Path(os.environ.get('TORCH_HOME', Path.home() / '.cache' / 'torch')) / 'hub' / 'checkpoints'
        try:
            state = enum.get_state_dict(progress=False)
        except Exception as err:  # noqa: BLE001 - any download failure gets the same advice
            raise UserError(
                f'could not obtain the {weights} weights of {name} ({type(err).__name__}: {err}).\n'
                f'  This machine is probably offline. On a connected machine download\n    {enum.url}\n'
                f'  then either pass --backbone-weights /path/to/{file}\n'
                f'  or place the file at {hub / file} (set TORCH_HOME to use another cache folder).') from err
    else:
        path = Path(weights)
        if not path.is_file():
            example = Path(enum.url).name if enum is not None else f'{name.removesuffix("-deep")}.pth'
            raise UserError(f'--backbone-weights {weights}: no such file (expected {", ".join(WEIGHT_CHOICES)} or a '
                            f'path to a {name} state dict such as {example})')
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise UserError(f'could not read backbone weights {path}: {type(err).__name__}: {err}') from err
        if isinstance(state, dict) and 'state_dict' in state and isinstance(state['state_dict'], dict):
            state = state['state_dict']
        if not isinstance(state, dict):
            raise UserError(f'{path} does not hold a state dict for {name}')
    state = strip_prefixes(state)
    if state and all(k.startswith(('backbone.', 'classifier.', 'aux_classifier.')) for k in state):
        # a torchvision segmentation model (e.g. deeplabv3_resnet101_coco, Q-Net's initialisation): its backbone
        state = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    state = {k: v for k, v in state.items() if not k.startswith(('fc.', 'classifier.'))}
    expected = {k for k in net.state_dict() if not k.startswith(('fc.', 'classifier.'))}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f'backbone weights {weights} do not fit {name}: missing {missing[:5]}'
                        f'{"..." if len(missing) > 5 else ""}, unexpected {unexpected[:5]}'
                        f'{"..." if len(unexpected) > 5 else ""}')
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise UserError(f'backbone weights {weights} do not fit {name}: {err}') from err
