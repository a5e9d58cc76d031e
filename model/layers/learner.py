r"""HSNet's hypercorrelation squeeze-and-mix learner (4D encoder + 2D decoder), shared by HSNet-family methods."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.layers.conv4d import CenterPivotConv4d


class GroupNormLast(nn.GroupNorm):
    r"""nn.GroupNorm (same parameters, same maths) for 4D tensors stored channels-last, [B,C,*dims] in memory order
    B,*dims,C, without a layout copy.

    On CPU the statistics are computed here rather than by PyTorch's channels-last group-norm kernel, which sums
    x and x² in one float32 pass along the whole group: its error grows with the group size (HSNet's first 4D
    block at 400x400 normalises groups of 1.7 M values; ~3e-5 relative error there, up to ~1e-3 when the mean is
    large, against ~1e-7 for nn.GroupNorm on NCHW). Here (`group_moments`): each column of the [B,rows,inner]
    view is summed with PyTorch's cascade reduction after subtracting the column's first value (no cancellation in
    the sum of squares), the column moments are combined per group in float64 (Chan et al.'s pairwise formula),
    and y = x·scale + shift is one fused pass into the buffer that held the shifted copy (one allocation, as the
    native kernel). The backward is PyTorch's own group-norm backward with these
    statistics. Other devices use F.group_norm on the NHWC view (their kernels accumulate with Welford's method).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xl = x.movedim(1, -1)                                                       # [B,...,C]
        if not xl.is_contiguous():
            return super().forward(x)
        bsz, ch = x.shape[:2]
        if x.device.type == 'cpu':
            return _GroupNormChannelsLast.apply(xl, self.weight, self.bias, self.num_groups, self.eps).movedim(-1, 1)
        img = xl.reshape(bsz, -1, 1, ch).permute(0, 3, 1, 2)                       # [B,C,S,1], NHWC strides
        y = F.group_norm(img, self.num_groups, self.weight, self.bias, self.eps)
        return y.permute(0, 2, 3, 1).reshape(xl.shape).movedim(-1, 1)


#: Column sums over [B,rows,cols] vectorise well from about this many columns on.
_MIN_COLUMNS = 256


def group_moments(x: torch.Tensor, groups: int, work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and biased variance, in float64, per (batch item, group) of x [B,*dims,C] (contiguous, channels last).

    x is viewed as [B,R,J] with the J values of its trailing dims (J >= `_MIN_COLUMNS` where the dims allow) as
    columns; a column holds one channel. Per column j, shifted by its first value s_j: S1_j = Σ(x - s_j) and
    S2_j = Σ(x - s_j)² by PyTorch's cascade summation over the R rows, mean_j = s_j + S1_j / R and
    M2_j = S2_j - S1_j² / R (the shift keeps S2_j free of cancellation). Per group of columns (Chan et al.'s
    pairwise update): mean = avg_j mean_j, M2 = Σ_j M2_j + R Σ_j (mean_j - mean)², var = M2 / (R · #columns).
    `work`, a contiguous tensor of x's size, holds the shifted copy (default: a new one). Whole-tensor operations
    only: a handful of parallel regions per call, which matters on a busy machine (a loop over cache-sized blocks
    was faster alone but several times slower than this under load).
    """
    bsz, ch = x.shape[0], x.shape[-1]
    dims = list(x.shape[1:-1])
    cols = ch
    while dims and cols < _MIN_COLUMNS:
        cols *= dims.pop()
    rows = x[0].numel() // cols
    xc = x.reshape(bsz, rows, cols)                                                 # [B,R,J]
    shift = xc[:, :1]                                                               # [B,1,J]
    dev = torch.sub(xc, shift, out=work.view(bsz, rows, cols)) if work is not None else xc - shift
    s1 = dev.sum(dim=1).double()                                                    # [B,J]
    s2 = dev.mul_(dev).sum(dim=1).double()
    mean_col = (shift[:, 0].double() + s1 / rows).view(bsz, cols // ch, groups, ch // groups)   # [B,J/C,G,C/G]
    m2_col = (s2 - s1 * s1 / rows).clamp_(min=0).view(bsz, cols // ch, groups, ch // groups)
    mean = mean_col.mean(dim=(1, 3))                                                # [B,G]
    m2 = m2_col.sum(dim=(1, 3)) + rows * (mean_col - mean[:, None, :, None]).square().sum(dim=(1, 3))
    return mean, m2 / (rows * cols // groups)


class _GroupNormChannelsLast(torch.autograd.Function):
    r"""Group norm of x [B,*dims,C] (contiguous) with the statistics of `group_moments`; PyTorch's backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        bsz, ch = x.shape[0], x.shape[-1]
        with torch.no_grad():
            y = torch.empty_like(x, memory_format=torch.contiguous_format)
            mean, var = group_moments(x, groups, work=y)                            # y: scratch, then the output
            rstd = (var + eps).rsqrt()                                              # [B,G] float64
            per_ch = ch // groups
            w = weight.double() if weight is not None else torch.ones(ch, dtype=torch.float64, device=x.device)
            b = bias.double() if bias is not None else torch.zeros(ch, dtype=torch.float64, device=x.device)
            scale = rstd.repeat_interleave(per_ch, dim=1) * w                       # [B,C]
            shift = b - mean.repeat_interleave(per_ch, dim=1) * scale
            # one fused pass: y = x * scale + shift, written in x's shape (a view would clash with in-place ReLUs)
            per_channel = (bsz,) + (1,) * (x.dim() - 2) + (ch,)
            torch.addcmul(shift.to(x.dtype).view(per_channel), x, scale.to(x.dtype).view(per_channel), out=y)
        ctx.groups = groups
        ctx.save_for_backward(x, weight, mean.to(x.dtype), rstd.to(x.dtype))
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        bsz, ch = x.shape[0], x.shape[-1]
        size = x[0].numel() // ch
        img = x.view(bsz, size, 1, ch).permute(0, 3, 1, 2)                          # [B,C,S,1] NHWC strides
        grad_img = grad.contiguous().view(bsz, size, 1, ch).permute(0, 3, 1, 2)
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(grad_img, img, mean, rstd, weight, bsz, ch, size,
                                                               ctx.groups, mask)
        gx = gx.permute(0, 2, 3, 1).reshape(x.shape) if gx is not None else None
        return gx, gw, gb, None, None


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
