r"""Multi-layer cosine correlation (HSNet's hypercorrelation), one batched matmul per backbone stage."""
import torch


def _normalise(x: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    # Same epsilon placement as HSNet: x / (||x||_2 + eps), so empty (masked-out) support pixels give 0.
    return x / (x.norm(dim=dim, keepdim=True) + eps)


def multilayer_correlation(query_feats: list[torch.Tensor], support_feats: list[torch.Tensor],
                           stage_ids: list[int], eps: float = 1e-5) -> list[torch.Tensor]:
    r"""All-pairs cosine similarity between query and support pixels, clamped at 0, stacked per stage.

    Args:
        query_feats: per tap [Nq,C_l,hq_l,wq_l].
        support_feats: per tap [Nq*K,C_l,hs_l,ws_l]; support n*K+k is matched with query n. With K > 1 the query
            features are used once for all K supports (no copy of the query taps).
        stage_ids: the stage of each tap (e.g. 2,2,2,2,3,...,4 for ResNet-50). Taps of one stage share shape.
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
        q = torch.stack([query_feats[i] for i in taps], dim=1)         # [Nq,L,C,hq,wq]
        s = torch.stack([support_feats[i] for i in taps], dim=1)       # [Nq*K,L,C,hs,ws]
        _, nl, c, hq, wq = q.shape
        hs, ws = s.shape[-2:]
        q = _normalise(q.reshape(nq, nl, c, hq * wq), 2, eps)                      # [Nq,L,C,HWq]
        s = _normalise(s.reshape(nq, k, nl, c, hs * ws), 3, eps)                   # [Nq,K,L,C,HWs]
        if c <= SMALL_CHANNELS:
            out.append(_small_channel_correlation(q, s, (hq, wq, hs, ws)))
            continue
        q = q.reshape(nq * nl, c, hq * wq)                                          # [Nq*L,C,HWq]
        s = s.permute(0, 2, 3, 1, 4).reshape(nq * nl, c, k * hs * ws)              # [Nq*L,C,K*HWs]
        corr = torch.bmm(q.transpose(1, 2), s).clamp_(min=0)                       # [Nq*L,HWq,K*HWs]
        corr = corr.view(nq, nl, hq, wq, k, hs, ws).permute(0, 4, 1, 2, 3, 5, 6)  # [Nq,K,L,hq,wq,hs,ws]
        out.append(corr.reshape(nq * k, nl, hq, wq, hs, ws))
    return out


# Below this many channels a matmul is mostly overhead (PATNet's rank-2 path correlates 2-channel maps).
SMALL_CHANNELS = 4


def _small_channel_correlation(q: torch.Tensor, s: torch.Tensor, dims: tuple[int, int, int, int]) -> torch.Tensor:
    r"""Σ_c q_c ⊗ s_c by broadcasting, written straight into the channels-last order [Nq,K,HWq,HWs,L] that the
    4D convolution reads without a copy. q [Nq,L,C,HWq], s [Nq,K,L,C,HWs] (normalised) -> [Nq*K,L,hq,wq,hs,ws].

    The per-channel operands are made contiguous with L innermost (they are tiny): a broadcast product takes its
    memory order from its operands, and with L innermost in both it is the channels-last order wanted here (with
    the operands' own [L,HW] order it would be written L-outermost and the 4D conv would have to copy it back).
    """
    nq, k, nl, c, _ = s.shape
    hq, wq, hs, ws = dims
    qc = q.permute(0, 2, 3, 1).contiguous()                                        # [Nq,C,HWq,L]
    sc = s.permute(0, 1, 3, 4, 2).contiguous()                                     # [Nq,K,C,HWs,L]
    corr = qc[:, None, 0, :, None] * sc[:, :, 0, None]                             # [Nq,K,HWq,HWs,L]
    for ci in range(1, c):
        corr.addcmul_(qc[:, None, ci, :, None], sc[:, :, ci, None])
    corr.clamp_(min=0)
    return corr.view(nq * k, hq, wq, hs, ws, nl).permute(0, 5, 1, 2, 3, 4)       # [Nq*K,L,hq,wq,hs,ws]
