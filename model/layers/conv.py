r"""2D convolution kept on oneDNN on CPU, for every method's 1x1 convolutions (backbone, heads)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


#: ATen sends a single-image convolution this small to its reference kernel whatever it is (`use_mkldnn`): a dilated
#: one would then take the much slower dilated reference kernel, so such maps keep their plain 1x1 convolution.
ONEDNN_MIN_NUMEL = 20480


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=(1, 1), padding=(0, 0),
           dilation=(1, 1), groups: int = 1) -> torch.Tensor:
    r"""F.conv2d, except that on CPU a float32 1x1 stride-1 convolution is marked dilated.

    PyTorch runs such a convolution with its slow reference kernel (`_slow_conv2d_forward`, which also copies a
    channels-last map to NCHW and back) whenever it runs single-threaded with a batch below 16 (ATen's `use_mkldnn`:
    "THNN is faster when single-threaded"). A ResNet-50 has 33 of them, Q-Net's head 4 more on 1024-2048 channels.
    For a 1x1 kernel dilation changes nothing (one tap; the output size stays H - d(k - 1) = H), and it sends the
    convolution to oneDNN, 5-30 % faster here (scripts/bench.py --profile), unless the map is a single image of at
    most 20,480 values, which ATen keeps on its reference kernels in any case (`ONEDNN_MIN_NUMEL`). Other dtypes
    (float64 has no oneDNN path; bf16 already takes it), devices and kernels: F.conv2d as given.
    """
    if (x.device.type == 'cpu' and x.dtype == torch.float32 and weight.shape[-2:] == (1, 1)
            and tuple(dilation) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
            and (x.shape[0] > 1 or x.numel() > ONEDNN_MIN_NUMEL) and not torch.is_autocast_enabled('cpu')):
        dilation = (2, 2)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class Conv2d(nn.Conv2d):
    r"""nn.Conv2d through `conv2d` (same parameters, same state-dict keys)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != 'zeros':
            return super()._conv_forward(input, weight, bias)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
