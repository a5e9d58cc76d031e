r"""Multi-layer cosine correlation (HSNet's hypercorrelation), one batched matmul per backbone stage."""
import torch

from model.layers.pooling import resize_mask


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    r"""x in float32 if it is in a lower precision (bf16/fp16 under autocast); float32/float64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _normalise(x: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    # Same epsilon placement as HSNet: x / (||x||_2 + eps), so empty (masked-out) support pixels give 0. In place
    # (x is a fresh stack) unless autograd needs x itself.
    norm = x.norm(dim=dim, keepdim=True) + eps
    return x / norm if x.requires_grad else x.div_(norm)


def multilayer_correlation(query_feats: list[torch.Tensor], support_feats: list[torch.Tensor],
                           stage_ids: list[int], eps: float = 1e-5,
                           support_masks: torch.Tensor | None = None, dense: bool = False) -> list[torch.Tensor]:
    r"""All-pairs cosine similarity between query and support pixels, clamped at 0, stacked per stage.

    Args:
        query_feats: per tap [Nq,C_l,hq_l,wq_l].
        support_feats: per tap [Nq*K,C_l,hs_l,ws_l]; support n*K+k is matched with query n. With K > 1 the query
            features are used once for all K supports (no copy of the query taps).
        stage_ids: the stage of each tap (e.g. 2,2,2,2,3,...,4 for ResNet-50). Taps of one stage share shape.
        support_masks: [Nq*K,H,W] or None: correlate the support taps multiplied by these masks (resized to each
            tap, exactly `mask_features`: HSNet's masked support), applied to the stage's stacked copy instead of
            making a masked copy of every tap first.
        dense: always one product per stage over every support pixel, as the reference code computes it (and this
            function on a GPU or under autograd); by default the CPU path without autograd skips support pixels
            whose features are all zero (`_cpu_correlation`). Both give the same values.
    Returns:
        One tensor per stage, deepest stage first: [Nq*K, L_stage, hq, wq, hs, ws].
    """
    nq, ns = query_feats[0].shape[0], support_feats[0].shape[0]
    if ns % nq:
        raise ValueError(f'{ns} support maps cannot be split evenly over {nq} queries')
    k = ns // nq
    out = []
    for stage in sorted(set(stage_ids), reverse=True):
        taps = [i for i, s in enumerate(stage_ids) if s == stage]
        q = _stack_channels_last([query_feats[i] for i in taps])       # [Nq,L,C,hq,wq]
        s = _stack_channels_last([support_feats[i] for i in taps])     # [Nq*K,L,C,hs,ws]
        _, nl, c, hq, wq = q.shape
        hs, ws = s.shape[-2:]
        if support_masks is not None:
            mask = resize_mask(support_masks, (hs, ws), s.dtype)[:, :, None]                # [Nq*K,1,1,hs,ws]
            s = s * mask if s.requires_grad else s.mul_(mask)
        q = _normalise(q.reshape(nq, nl, c, hq * wq), 2, eps)                      # [Nq,L,C,HWq]
        s = _normalise(s.reshape(nq, k, nl, c, hs * ws), 3, eps)                   # [Nq,K,L,C,HWs]
        if c <= SMALL_CHANNELS:
            # a few channels: cheap, and bf16 would leave ~2 significant digits of each cosine -> full precision
            with torch.autocast(q.device.type, enabled=False):
                out.append(_small_channel_correlation(at_least_fp32(q), at_least_fp32(s), (hq, wq, hs, ws)))
            continue
        if q.device.type == 'cpu' and not (dense or q.requires_grad or s.requires_grad):
            out.append(_cpu_correlation(q, s, (hq, wq, hs, ws), channels_last=torch.is_grad_enabled()))
            continue
        q = q.reshape(nq * nl, c, hq * wq)                                          # [Nq*L,C,HWq]
        s = s.permute(0, 2, 3, 1, 4).reshape(nq * nl, c, k * hs * ws)              # [Nq*L,C,K*HWs]
        corr = torch.bmm(q.transpose(1, 2), s).clamp_(min=0)                       # [Nq*L,HWq,K*HWs]
        corr = corr.view(nq, nl, hq, wq, k, hs, ws).permute(0, 4, 1, 2, 3, 5, 6)  # [Nq,K,L,hq,wq,hs,ws]
        out.append(corr.reshape(nq * k, nl, hq, wq, hs, ws))
    return out


def _stack_channels_last(taps: list[torch.Tensor]) -> torch.Tensor:
    r"""Taps [N,C,h,w] -> [N,L,C,h,w] stored N,L,h,w,C, whatever the taps' strides (the backbone's channels-last maps
    are read without a transpose). A fixed layout keeps the products below, and so the logits, independent of how
    a plug-in or a slice happened to store its maps."""
    return torch.stack([t.movedim(1, -1) for t in taps], dim=1).movedim(-1, 2)


def _cpu_correlation(q: torch.Tensor, s: torch.Tensor, dims: tuple[int, int, int, int],
                     channels_last: bool = False) -> torch.Tensor:
    r"""The wide-channel correlation without autograd on CPU. q [Nq,L,C,HWq], s [Nq,K,L,C,HWs] (normalised) ->
    [Nq*K,L,hq,wq,hs,ws] stored in memory order Nq,K,hq,wq,L,hs,ws, or with `channels_last` Nq,K,hq,wq,hs,ws,L (the
    NHWC batch that the first support-dim convolution takes when its weights get a gradient: the learner in
    training or adapting, where converting the NCHW order cost a 100 MB copy at 400x400).

    Two savings over one dense product per stage:
    - Support columns that are zero in every batch item (masked-out support pixels: their cosines are exactly 0)
      are skipped: a masked HSNet support typically keeps a third of them. Finding them needs a host sync, which
      is why this is the CPU path (a GPU does the dense product cheaply).
    - The output order is the one the learner's first support-dim convolution reads as a contiguous batch
      [Nq*K*hq*wq, L, hs, ws], NCHW or NHWC (model/layers/conv4d.py), so no layout copy of the largest tensor of
      the forward (HSNet, 400x400: 100 MB at layer 2) is made; the products are written in blocks of about 16 MB.
    """
    nq, k, nl, c, hws = s.shape
    hq, wq, hs, ws = dims
    hwq = hq * wq
    out = q.new_zeros((nq, k, hwq, hws, nl) if channels_last else (nq, k, hwq, nl, hws))
    qt = q.reshape(nq * nl, c, hwq).transpose(1, 2)                                # [Nq*L,HWq,C]
    block = max(1, (1 << 22) // max(1, nq * nl * hwq))                              # columns per ~16 MB block
    for shot in range(k):
        sk = s[:, shot].reshape(nq * nl, c, hws)                                    # [Nq*L,C,HWs]
        keep = (sk.amax(dim=(0, 1)) != 0) | (sk.amin(dim=(0, 1)) != 0)              # [HWs], no copy of sk
        cols = keep.nonzero().squeeze(1) if int(keep.sum()) <= 0.8 * hws else None
        dest = out[:, shot].permute(*((0, 3, 1, 2) if channels_last else (0, 2, 1, 3)))    # [Nq,L,HWq,HWs] view
        if cols is None:
            for start in range(0, hws, block):
                part = torch.bmm(qt, sk[..., start:start + block]).clamp_(min=0)
                dest[..., start:start + block] = part.view(nq, nl, hwq, -1)
            continue
        for part_cols in cols.split(block):
            part = torch.bmm(qt, sk.index_select(2, part_cols)).clamp_(min=0)      # [Nq*L,HWq,n]
            dest.index_copy_(3, part_cols, part.view(nq, nl, hwq, -1))
    if channels_last:
        return out.view(nq * k, hq, wq, hs, ws, nl).permute(0, 5, 1, 2, 3, 4)      # [Nq*K,L,hq,wq,hs,ws]
    return out.view(nq * k, hq, wq, nl, hs, ws).permute(0, 3, 1, 2, 4, 5)


# Up to this many channels per tap the taps of a stage are correlated together, in the learner's layout (PATNet's
# rank-2 path correlates 2-channel maps); wider maps (HSNet: 512-2048) use one plain batched matmul per stage.
SMALL_CHANNELS = 4


def _small_channel_correlation(q: torch.Tensor, s: torch.Tensor, dims: tuple[int, int, int, int]) -> torch.Tensor:
    r"""The stage's L correlations written straight into the channels-last order [Nq,K,HWq,HWs,L] that the 4D
    convolution reads without a copy. q [Nq,L,C,HWq], s [Nq,K,L,C,HWs] (normalised) -> [Nq*K,L,hq,wq,hs,ws].

    One matrix product does it: the query pixels with all taps' channels side by side [HWq, L*C] times a
    block-diagonal support matrix [L*C, HWs*L] whose column (x, l) holds tap l's support pixel x in rows l*C..l*C+C-1
    and zeros elsewhere. With C <= 4 the product is bound by writing its output, which it does once (a broadcast
    product would write it once per channel).
    """
    nq, k, nl, c, hws = s.shape
    hq, wq, hs, ws = dims
    rows = q.permute(0, 3, 1, 2).reshape(nq, 1, hq * wq, nl * c)                   # [Nq,1,HWq,L*C]
    block = s.new_zeros(nq, k, nl, c, hws, nl)
    for tap in range(nl):
        block[:, :, tap, :, :, tap] = s[:, :, tap]
    corr = (rows @ block.view(nq, k, nl * c, hws * nl)).clamp_(min=0)              # [Nq,K,HWq,HWs*L]
    return corr.view(nq * k, hq, wq, hs, ws, nl).permute(0, 5, 1, 2, 3, 4)       # [Nq*K,L,hq,wq,hs,ws]
