r"""Center-pivot 4D convolution (Min et al., HSNet, ICCV 2021)."""
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F


class CenterPivotConv4d(nn.Module):
    r"""4D convolution whose kernel is non-zero only on the two "center-pivot" planes.

    For x [B,C,ha,wa,hb,wb] (query dims a, support dims b) the output is
        conv_a(x[..., ::s, ::s]) + conv_b(x)
    where conv_a is a 2D conv over the query dims applied at every kept support position, and conv_b a 2D conv
    over the support dims with stride s. This equals a full 4D convolution with kernel
    W_a ⊗ δ_center(b) + δ_center(a) ⊗ W_b, padding k//2 and stride (1, 1, s, s).

    Unlike the reference, pruning the support dims is a stateless strided slice, so the layer is correct for any
    input size on every call (the reference caches a gather index built from the first input's size).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, support_stride: int = 1,
                 bias: bool = True):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError('center-pivot 4D conv needs an odd kernel size')
        pad = kernel_size // 2
        self.stride = support_stride
        self.conv_query = nn.Conv2d(in_channels, out_channels, kernel_size, padding=pad, bias=bias)
        self.conv_support = nn.Conv2d(in_channels, out_channels, kernel_size, stride=support_stride, padding=pad,
                                      bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r"""x [B,C,ha,wa,hb,wb] (any strides) -> [B,oc,ha,wa,hb',wb'] stored channels-last, i.e. in memory order
        B,ha,wa,hb',wb',oc.

        Both 2D convs run in channels_last and their results are read through free views of the NHWC buffers. The
        output keeps the support-dim conv's memory order, which is exactly what the next layer's support-dim conv
        reads, so a stack of these layers (with `GroupNormLast` between them) never converts layouts back and forth
        (the learner runs ~35% faster on a 2-core CPU than with the reference's NCHW permute().contiguous() trips).
        """
        bsz, ch, ha, wa, hb, wb = x.shape
        s = self.stride
        pruned = x[..., ::s, ::s] if s > 1 else x                                  # [B,C,ha,wa,hb',wb']
        hb2, wb2 = pruned.shape[-2:]

        # conv over query dims: [B,C,ha,wa,hb',wb'] -> [B*hb'*wb',C,ha,wa] (NHWC)
        y1 = pruned.permute(0, 4, 5, 1, 2, 3).reshape(bsz * hb2 * wb2, ch, ha, wa)
        y1 = self.conv_query(y1.contiguous(memory_format=torch.channels_last))
        oc = y1.shape[1]
        y1 = y1.permute(0, 2, 3, 1).reshape(bsz, hb2, wb2, ha, wa, oc)             # [B,hb',wb',ha,wa,oc]

        # conv over support dims: [B,C,ha,wa,hb,wb] -> [B*ha*wa,C,hb,wb]: NHWC (no copy for a channels-last x),
        # or NCHW as it is when x is stored B,ha,wa,C,hb,wb (the CPU correlation's order: converting 100 MB costs
        # more than the NCHW kernel loses), except when the weights get a gradient: the weight gradient of a
        # few-channel NCHW map is 5x slower than the NHWC one (HSNet's first layer, 400x400: 0.67 s vs 0.14 s
        # forward + backward), which pays for the conversion
        y2 = x.permute(0, 2, 3, 1, 4, 5).reshape(bsz * ha * wa, ch, hb, wb)
        if not y2.is_contiguous() or (torch.is_grad_enabled() and self.conv_support.weight.requires_grad):
            y2 = y2.contiguous(memory_format=torch.channels_last)
        y2 = self._support_conv(y2).reshape(bsz, ha, wa, hb2, wb2, oc)            # [B,ha,wa,hb',wb',oc]

        out = y2.add_(y1.permute(0, 3, 4, 1, 2, 5))                                # [B,ha,wa,hb',wb',oc]
        return out.permute(0, 5, 1, 2, 3, 4)                                       # [B,oc,ha,wa,hb',wb']

    def _support_conv(self, x: torch.Tensor) -> torch.Tensor:
        r"""conv_support on x [N,C,hb,wb] (NHWC or NCHW) -> [N,hb',wb',oc] (contiguous for NHWC x).

        HSNet's mixing layers convolve 2x2 support maps with 3x3 kernels, where a direct convolution spends more than
        half its work on padding. When the map has fewer pixels than the kernel, the convolution is applied instead
        as the equivalent dense linear map [hb*wb*C] -> [hb'*wb'*oc] (one matmul, ~2.5x faster on CPU; same maths,
        differentiable in the weights).
        """
        n, c, hb, wb = x.shape
        conv = self.conv_support
        k = conv.kernel_size[0]
        if hb * wb >= k * k:
            return conv(x).permute(0, 2, 3, 1)
        index, (hb2, wb2) = _dense_conv_index(hb, wb, k, self.stride, x.device)     # [hb*wb, hb'*wb'] into k*k+1
        weight = torch.cat([conv.weight.flatten(2), conv.weight.new_zeros(conv.out_channels, c, 1)], dim=2)
        dense = weight[:, :, index]                                                # [oc,C,hb*wb,hb'*wb']
        dense = dense.permute(2, 1, 3, 0).reshape(hb * wb * c, hb2 * wb2 * conv.out_channels)
        flat = x.permute(0, 2, 3, 1).reshape(n, hb * wb * c)                       # a free view for NHWC x
        bias = None if conv.bias is None else conv.bias.repeat(hb2 * wb2)
        y = F.linear(flat, dense.t(), bias)                                        # [N, hb'*wb'*oc]
        return y.view(n, hb2, wb2, conv.out_channels)


@lru_cache(maxsize=64)
def _dense_conv_index(hb: int, wb: int, k: int, stride: int,
                      device: torch.device) -> tuple[torch.Tensor, tuple[int, int]]:
    r"""For a k x k conv (padding k//2, stride s) on an hb x wb map: index[q, p] = the kernel tap (kh*k + kw) linking
    input pixel q to output pixel p, or k*k (a zero slot) where they are not linked; and the output size. Cached per
    shape and device (a pure function of its arguments)."""
    pad = k // 2
    hb2, wb2 = (hb + 2 * pad - k) // stride + 1, (wb + 2 * pad - k) // stride + 1
    index = torch.full((hb * wb, hb2 * wb2), k * k, dtype=torch.long)
    for ph in range(hb2):
        for pw in range(wb2):
            for kh in range(k):
                for kw in range(k):
                    qh, qw = ph * stride + kh - pad, pw * stride + kw - pad
                    if 0 <= qh < hb and 0 <= qw < wb:
                        index[qh * wb + qw, ph * wb2 + pw] = kh * k + kw
    return index.to(device), (hb2, wb2)
