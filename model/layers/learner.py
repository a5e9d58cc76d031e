r"""HSNet's hypercorrelation squeeze-and-mix learner (4D encoder + 2D decoder), shared by HSNet-family methods."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.layers.conv4d import CenterPivotConv4d


class GroupNormLast(nn.GroupNorm):
    r"""nn.GroupNorm (same parameters, same maths) for 4D tensors stored channels-last: the tensor is viewed as an
    NHWC image [B,C,S,1] so PyTorch's channels-last group-norm kernel runs without a layout copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xl = x.movedim(1, -1)                                                       # [B,...,C]
        if not xl.is_contiguous():
            return super().forward(x)
        bsz, ch = x.shape[:2]
        img = xl.reshape(bsz, -1, 1, ch).permute(0, 3, 1, 2)                       # [B,C,S,1], NHWC strides
        y = F.group_norm(img, self.num_groups, self.weight, self.bias, self.eps)
        return y.permute(0, 2, 3, 1).reshape(xl.shape).movedim(-1, 1)


def _block(in_channels: int, out_channels: list[int], kernels: list[int], strides: list[int], groups: int = 4):
    layers = []
    for i, (oc, k, s) in enumerate(zip(out_channels, kernels, strides)):
        ic = in_channels if i == 0 else out_channels[i - 1]
        layers += [CenterPivotConv4d(ic, oc, k, s), GroupNormLast(groups, oc), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _resize_query_dims(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    r"""Bilinearly resize the query dims (ha, wa) of [B,C,ha,wa,hb,wb]."""
    bsz, ch, ha, wa, hb, wb = x.shape
    if (ha, wa) == tuple(size):
        return x
    y = x.permute(0, 4, 5, 1, 2, 3).reshape(bsz * hb * wb, ch, ha, wa)
    y = F.interpolate(y, size, mode='bilinear', align_corners=True)
    return y.view(bsz, hb, wb, ch, *size).permute(0, 3, 4, 5, 1, 2).contiguous()


class HPNLearner(nn.Module):
    r"""Squeezes each stage's correlation stack [B,L,ha,wa,hb,wb], mixes stages top-down, decodes 2-class logits.

    Args:
        in_channels: taps per stage, deepest stage first (ResNet-50: [3, 6, 4]).
    Kernel sizes / support strides follow HSNet: deepest 3,3,3 / 2,2,2; middle 5,3,3 / 4,2,2;
    shallowest 5,5,3 / 4,4,2; channels 16, 64, 128.
    """

    def __init__(self, in_channels: list[int]):
        super().__init__()
        c1, c2, c3 = 16, 64, 128
        self.squeeze = nn.ModuleList([
            _block(in_channels[0], [c1, c2, c3], [3, 3, 3], [2, 2, 2]),
            _block(in_channels[1], [c1, c2, c3], [5, 3, 3], [4, 2, 2]),
            _block(in_channels[2], [c1, c2, c3], [5, 5, 3], [4, 4, 2]),
        ])
        self.mix43 = _block(c3, [c3, c3, c3], [3, 3, 3], [1, 1, 1])
        self.mix32 = _block(c3, [c3, c3, c3], [3, 3, 3], [1, 1, 1])
        self.decoder1 = nn.Sequential(nn.Conv2d(c3, c3, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(c3, c2, 3, padding=1), nn.ReLU())
        self.decoder2 = nn.Sequential(nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(c2, 2, 3, padding=1))

    def encode(self, corrs: list[torch.Tensor]) -> torch.Tensor:
        r"""Correlation pyramid (deepest first) -> squeezed and mixed 4D tensor [B,128,ha,wa,hb,wb]."""
        sq4, sq3, sq2 = (block(c) for block, c in zip(self.squeeze, corrs))
        # Squeezed support dims may differ by a pixel between stages for odd sizes; match them before adding.
        mix = self.mix43(_match_support(_resize_query_dims(sq4, sq3.shape[2:4]), sq3) + sq3)
        mix = self.mix32(_match_support(_resize_query_dims(mix, sq2.shape[2:4]), sq2) + sq2)
        return mix

    def decode(self, encoded: torch.Tensor) -> torch.Tensor:
        r"""[B,128,ha,wa,hb,wb] -> average over support dims -> 2-class logits at 2x the query-dim size."""
        x = encoded.flatten(-2).mean(-1)                                   # [B,128,ha,wa]
        x = self.decoder1(x)
        x = F.interpolate(x, (x.shape[-2] * 2, x.shape[-1] * 2), mode='bilinear', align_corners=True)
        return self.decoder2(x)

    def forward(self, corrs: list[torch.Tensor]) -> torch.Tensor:
        return self.decode(self.encode(corrs))


def _match_support(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    r"""Bring the support dims of x to those of ref (identity at HSNet's 400x400, where all are 2x2)."""
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    bsz, ch, ha, wa, hb, wb = x.shape
    y = x.reshape(bsz, ch * ha * wa, hb, wb)
    y = F.interpolate(y, ref.shape[-2:], mode='bilinear', align_corners=True)
    return y.view(bsz, ch, ha, wa, *ref.shape[-2:])
