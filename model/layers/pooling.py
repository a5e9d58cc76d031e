r"""Mask resizing, masked feature maps and masked average pooling (MAP)."""
import torch
import torch.nn.functional as F


def resize_mask(mask: torch.Tensor, size: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""[N,H,W] binary mask -> [N,1,h,w] in `dtype` (the maps' dtype), bilinear with aligned corners (as HSNet's
    `mask_feature`). Interpolated in float32, or in float64 for float64 maps (float32 interpolation weights alone
    move PMMs' EM by up to 1e-4 in a float64 comparison with its reference)."""
    mask = mask.unsqueeze(1).to(torch.float64 if dtype == torch.float64 else torch.float32)
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = F.interpolate(mask, size, mode='bilinear', align_corners=True)
    return mask.to(dtype)


def resized_masks(mask: torch.Tensor, feats: list[torch.Tensor]) -> dict[tuple[int, int], torch.Tensor]:
    r"""The mask [N,H,W] resized once per distinct size of the maps [N,C,h,w]: {(h, w): [N,1,h,w]} in the maps'
    dtype."""
    out: dict[tuple[int, int], torch.Tensor] = {}
    for feat in feats:
        size = tuple(feat.shape[-2:])
        if size not in out:
            out[size] = resize_mask(mask, size, feat.dtype)
    return out


def mask_features(feats: list[torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
    r"""Multiply every feature map [N,C,h,w] by the mask resized to its size (one resize per distinct size)."""
    masks = resized_masks(mask, feats)
    return [feat * masks[tuple(feat.shape[-2:])] for feat in feats]


def masked_average_pooling(feat: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    r"""MAP(F, m) = Σ_xy F·m / (Σ_xy m + eps).  feat [N,C,h,w]; mask [N,M,h,w] (M masks) already at the feature
    size, or [N,H,W] at image size (then resized bilinearly). Returns [N,C] for one mask, [N,M,C] for M > 1.

    Computed as one batched matrix product [N,M,hw] x [N,hw,C]: the features are read once, in whatever memory
    order they have (the backbone's channels-last maps need no copy), and no masked copy of them is made. A sum over
    thousands of pixels: it runs in at least float32 also under autocast (prototypes feed PATNet's Gram, which
    squares their conditioning).
    """
    if mask.dim() == 3:
        mask = resize_mask(mask, tuple(feat.shape[-2:]), torch.promote_types(feat.dtype, torch.float32))
    with torch.autocast(feat.device.type, enabled=False):
        feat = feat if feat.dtype in (torch.float32, torch.float64) else feat.float()
        mask = mask.to(feat.dtype).flatten(2)                                      # [N,M,hw]
        pooled = (mask @ feat.flatten(2).transpose(1, 2)) / (mask.sum(dim=2, keepdim=True) + eps)   # [N,M,C]
    return pooled.squeeze(1) if pooled.shape[1] == 1 else pooled
