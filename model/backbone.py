r"""Frozen ImageNet backbones that return HSNet's intermediate feature taps in one pass."""
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import models

from common.checkpoint import strip_prefixes
from common.errors import UserError

# name -> (torchvision constructor, weights enum, bottlenecks per layer1..4 for ResNets)
_SPECS = {
    'resnet50': (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1, [3, 4, 6, 3]),
    'resnet101': (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V1, [3, 4, 23, 3]),
    'vgg16': (models.vgg16, models.VGG16_Weights.IMAGENET1K_V1, None),
}
BACKBONES = tuple(_SPECS)

# VGG-16 taps as in HSNet: conv4_1..4_3 and conv5_1..5_3 before their ReLU, and pool5.
_VGG_TAPS = {17: 2, 19: 2, 21: 2, 24: 3, 26: 3, 28: 3, 30: 4}


class Backbone(nn.Module):
    r"""Frozen feature extractor (BN in eval mode, no gradients).

    ResNets return every bottleneck output of layer2-4 after the residual add and before the final ReLU
    (ResNet-50: 4 x 512 @ /8, 6 x 1024 @ /16, 3 x 2048 @ /32). `stage_ids[i]` is the stage (2, 3, 4) of tap i and
    `channels[i]` its width.

    Args:
        name: resnet50 | resnet101 | vgg16.
        weights: 'imagenet' (torchvision download, cached in $TORCH_HOME), a path to a local .pth state dict,
            'none' (random initialisation, with a loud warning; only for tests and the offline demo), or None when
            the weights will be loaded from a checkpoint right after construction.
    """

    def __init__(self, name: str = 'resnet50', weights: str | None = 'imagenet'):
        super().__init__()
        if name not in _SPECS:
            raise UserError(f'unknown backbone {name!r}; choose one of {", ".join(BACKBONES)}')
        build, enum, blocks = _SPECS[name]
        self.name = name
        self.weights = str(weights)
        self.net = build(weights=None)
        if weights is not None:
            _load_weights(self.net, name, enum, str(weights))
        if blocks is None:
            self.stage_ids = list(_VGG_TAPS.values())
            self.channels = [512] * len(_VGG_TAPS)
            del self.net.avgpool, self.net.classifier
        else:
            self.stage_ids = [stage + 1 for stage, n in enumerate(blocks) for _ in range(n)][blocks[0]:]
            widths = {2: 512, 3: 1024, 4: 2048}
            self.channels = [widths[s] for s in self.stage_ids]
            del self.net.fc
        self.requires_grad_(False)
        # NHWC convolutions: 22% faster ResNet-50 forward on a 2-core CPU; the preferred layout on tensor cores too.
        self.net.to(memory_format=torch.channels_last)
        self._fold_key, self._folded = None, {}
        self.eval()

    @property
    def stage_sizes(self) -> list[int]:
        r"""Number of taps per stage, deepest stage first (the HPN learner's input channels)."""
        return [self.stage_ids.count(s) for s in (4, 3, 2)]

    def train(self, mode: bool = True):
        # Frozen: BN keeps its ImageNet statistics whatever the surrounding model does.
        return super().train(False)

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

    @torch.no_grad()
    def forward(self, img: torch.Tensor) -> list[torch.Tensor]:
        img = img.contiguous(memory_format=torch.channels_last)
        if self.name == 'vgg16':
            return self._forward_vgg(img)
        return self._forward_resnet(img)

    def _conv_bn_pairs(self):
        net = self.net
        pairs = [(net.conv1, net.bn1)]
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in layer:
                pairs += [(block.conv1, block.bn1), (block.conv2, block.bn2), (block.conv3, block.bn3)]
                if block.downsample is not None:
                    pairs.append((block.downsample[0], block.downsample[1]))
        return pairs

    def _fold_batchnorm(self) -> dict:
        r"""Conv weights with the frozen BatchNorm folded in (w·γ/σ, β - μγ/σ): one pass per conv instead of two,
        about 10% of the forward. Rebuilt whenever a weight or statistic changes (tensor version counters), or
        the device or dtype does, so it can never go stale."""
        pairs = self._conv_bn_pairs()
        tensors = [t for conv, bn in pairs for t in (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)]
        key = (self.net.conv1.weight.device, self.net.conv1.weight.dtype, tuple(t._version for t in tensors),
               tuple(id(t) for t in tensors))
        if key != self._fold_key:
            folded = {}
            for conv, bn in pairs:
                scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
                weight = (conv.weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
                bias = bn.bias - bn.running_mean * scale
                if conv.bias is not None:
                    bias = bias + conv.bias * scale
                folded[conv] = (weight, bias)
            self._fold_key, self._folded = key, folded
        return self._folded

    def _forward_resnet(self, x: torch.Tensor, fold: bool = True) -> list[torch.Tensor]:
        folded = self._fold_batchnorm() if fold else None

        def conv_bn(conv, bn, inp):
            if folded is None:
                return bn(conv(inp))
            weight, bias = folded[conv]
            return F.conv2d(inp, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

        net = self.net
        x = net.maxpool(torch.relu(conv_bn(net.conv1, net.bn1, x)))
        feats = []
        for stage, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4), start=1):
            for block in layer:
                identity = x if block.downsample is None else conv_bn(*block.downsample, x)
                out = torch.relu(conv_bn(block.conv1, block.bn1, x))
                out = torch.relu(conv_bn(block.conv2, block.bn2, out))
                out = conv_bn(block.conv3, block.bn3, out) + identity
                if stage > 1:
                    feats.append(out)    # taps: bottleneck outputs of layer2-4 before the final ReLU
                x = torch.relu(out)      # not in place: `out` is kept as a tap
        return feats

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


def _load_weights(net: nn.Module, name: str, enum, weights: str) -> None:
    if weights == 'none':
        warnings.warn(f'\n{"!" * 78}\n!! backbone {name} has RANDOM weights (--backbone-weights none). Results mean '
                      f'nothing\n!! beyond tests and the offline demo; use --backbone-weights imagenet or a .pth file.'
                      f'\n{"!" * 78}', stacklevel=3)
        return
    if weights == 'imagenet':
        file = Path(enum.url).name
        hub = Path(os.environ.get('TORCH_HOME', Path.home() / '.cache' / 'torch')) / 'hub' / 'checkpoints'
        try:
            state = enum.get_state_dict(progress=False)
        except Exception as err:  # noqa: BLE001 - any download failure gets the same advice
            raise UserError(
                f'could not obtain the ImageNet weights of {name} ({type(err).__name__}: {err}).\n'
                f'  This machine is probably offline. On a connected machine download\n    {enum.url}\n'
                f'  then either pass --backbone-weights /path/to/{file}\n'
                f'  or place the file at {hub / file} (set TORCH_HOME to use another cache folder).') from err
    else:
        path = Path(weights)
        if not path.is_file():
            raise UserError(f'--backbone-weights {weights}: no such file (expected imagenet, none or a path to a '
                            f'{name} state dict such as {Path(enum.url).name})')
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise UserError(f'could not read backbone weights {path}: {type(err).__name__}: {err}') from err
        if isinstance(state, dict) and 'state_dict' in state and isinstance(state['state_dict'], dict):
            state = state['state_dict']
        if not isinstance(state, dict):
            raise UserError(f'{path} does not hold a state dict for {name}')
    state = {k: v for k, v in strip_prefixes(state).items() if not k.startswith(('fc.', 'classifier.'))}
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
