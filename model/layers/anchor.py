r"""Anchor transformation (PATNet's PATM, reused by DMTNet): the exact rank-2 closed form and the dense reference."""
import torch

# Both PATNet and DMTNet normalise prototype and anchor rows as x / (||x|| + 1e-6).
ROW_EPS = 1e-6


def normalize_rows(x: torch.Tensor, eps: float = ROW_EPS) -> torch.Tensor:
    r"""x / (||x||_2 + eps) along the last dim (the reference's epsilon placement: an all-zero row stays zero)."""
    return x / (x.norm(dim=-1, keepdim=True) + eps)


def pinv_sym2x2(g: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    r"""Moore-Penrose pseudo-inverse of a batch of symmetric positive semi-definite 2x2 matrices [...,2,2].

    With eigenvalues l1 >= l2 >= 0, l2 counts when l2 > rtol*l1 (default rtol = 2*eps of the dtype, the cut-off of
    `torch.linalg.pinv(g, hermitian=True)`):
        full rank: adj(G) / det(G);   rank 1: G / tr(G)^2 (exact for l2 = 0, relative error <= rtol otherwise);
        G = 0: 0.
    Closed form, elementwise over the batch: no eigendecomposition, no host synchronisation, differentiable (the
    branch not taken gets safe denominators, so its gradient is 0, never NaN). Use float64 when G is a Gram matrix
    of nearly parallel rows: forming G squares their condition number.
    """
    if g.shape[-2:] != (2, 2):
        raise ValueError(f'pinv_sym2x2 expects [...,2,2] matrices, got {tuple(g.shape)}')
    rtol = 2 * torch.finfo(g.dtype).eps if rtol is None else rtol
    a, b, d = g[..., 0, 0], 0.5 * (g[..., 0, 1] + g[..., 1, 0]), g[..., 1, 1]
    det = a * d - b * b
    trace = a + d
    with torch.no_grad():
        # Largest eigenvalue; l2 = det / l1, so "l2 > rtol * l1" is "det > rtol * l1^2" (no cancellation).
        l1 = 0.5 * trace + torch.sqrt((0.5 * (a - d)) ** 2 + b * b)
        full = det > rtol * l1 * l1
        nonzero = trace > 0
    adj = torch.stack([torch.stack([d, -b], -1), torch.stack([-b, a], -1)], -2)           # [...,2,2]
    inv_full = adj / torch.where(full, det, torch.ones_like(det))[..., None, None]
    inv_rank1 = g / torch.where(nonzero, trace * trace, torch.ones_like(trace))[..., None, None]
    inv_rank1 = inv_rank1 * nonzero[..., None, None].to(g.dtype)
    return torch.where(full[..., None, None], inv_full, inv_rank1)


def cholesky_2x2(m: torch.Tensor) -> torch.Tensor:
    r"""Lower-triangular L with L Lᵀ = M for a batch of symmetric positive (semi-)definite 2x2 matrices [...,2,2].

    Closed form (l11 = sqrt(m11), l21 = m21 / l11, l22 = sqrt(det / m11)); a singular M (parallel anchor rows) gives
    l22 = 0, which still factors M exactly. Needs m11 > 0 (a non-zero first anchor row).
    """
    m11, m21, m22 = m[..., 0, 0], m[..., 1, 0], m[..., 1, 1]
    l11 = m11.sqrt()
    l21 = m21 / l11
    l22 = ((m11 * m22 - m21 * m21) / m11).clamp_min(0).sqrt()
    zero = torch.zeros_like(l11)
    return torch.stack([torch.stack([l11, zero], -1), torch.stack([l21, l22], -1)], -2)


def cholesky_psd(m: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    r"""Lower-triangular L with L Lᵀ = M for a batch of small symmetric positive semi-definite matrices [...,n,n].

    Column by column (Cholesky-Crout) in closed form, elementwise over the batch: no LAPACK call and no error check,
    so no host synchronisation, and differentiable (DMTNet trains its anchors through it). A pivot below
    rtol * max(diag M) (default n * eps of the dtype) marks a row that depends linearly on the previous ones: its
    column is set to 0, which still factors a PSD M (up to that tolerance), and its gradient is 0, never NaN. Meant for
    n <= 4 (DMTNet's 4x4 anchor Gram); use float64. `cholesky_2x2` is the n = 2 case written out.
    """
    n = m.shape[-1]
    if m.shape[-2] != n:
        raise ValueError(f'cholesky_psd expects square [...,n,n] matrices, got {tuple(m.shape)}')
    rtol = n * torch.finfo(m.dtype).eps if rtol is None else rtol
    with torch.no_grad():
        floor = rtol * m.diagonal(dim1=-2, dim2=-1).amax(dim=-1)
    zero = torch.zeros_like(m[..., 0, 0])
    cols: list[list[torch.Tensor]] = []                 # cols[j][i] = L[i, j] for i >= j
    for j in range(n):
        pivot = m[..., j, j] - sum((cols[p][j] ** 2 for p in range(j)), zero)
        ok = pivot > floor
        diag = torch.where(ok, pivot, torch.ones_like(pivot)).sqrt()
        col = [torch.where(ok, diag, zero)]
        for i in range(j + 1, n):
            off = m[..., i, j] - sum((cols[p][i] * cols[p][j] for p in range(j)), zero)
            col.append(torch.where(ok, off / diag, zero))
        cols.append([zero] * j + col)
    return torch.stack([torch.stack(c, dim=-1) for c in cols], dim=-1)        # [...,i,j] = cols[j][i]


def rank2_coefficients(stack: torch.Tensor, eps: float = ROW_EPS) -> torch.Tensor:
    r"""Coefficient map of the anchor transform, in float64.

    Args:
        stack: [...,2,C] prototype rows (PATNet: [BP; FP]), any float dtype; not yet normalised.
    Returns:
        A = G⁺ Ĉ [...,2,C] float64, with Ĉ the row-normalised stack and G = Ĉ Ĉᵀ its 2x2 Gram. Since
        pinv(Ĉ) = Ĉᵀ (Ĉ Ĉᵀ)⁺, the reference transform Pᵀ f with P = pinv(Ĉ) R̂ equals R̂ᵀ (A f): a feature map is
        reduced to 2 channels a = A f and only expanded by R̂ᵀ if C channels are really needed.
    """
    c = normalize_rows(stack.to(torch.float64), eps)
    gram = c @ c.transpose(-1, -2)                                                    # [...,2,2]
    return pinv_sym2x2(gram) @ c


def anchor_factor(anchors: torch.Tensor, eps: float = ROW_EPS) -> torch.Tensor:
    r"""L [...,2,2] float64 with L Lᵀ = R̂ R̂ᵀ for row-normalised anchors R̂ ([...,2,C]).

    For 2-channel coefficients a, b: <R̂ᵀa, R̂ᵀb> = (Lᵀa)·(Lᵀb) and ||R̂ᵀa|| = ||Lᵀa||, so cosine correlations (with
    any x / (||x|| + eps) normalisation) of the expanded C-channel maps equal those of the 2-channel maps Lᵀa.
    """
    r = normalize_rows(anchors.to(torch.float64), eps)
    return cholesky_2x2(r @ r.transpose(-1, -2))


def dense_transform_matrix(stack: torch.Tensor, anchors: torch.Tensor, eps: float = ROW_EPS) -> torch.Tensor:
    r"""The reference formulation: P = pinv(Ĉ) R̂ [...,C,C] via an SVD pseudo-inverse; features map as Pᵀ f.

    stack: [...,2,C] prototype rows; anchors: [2,C] or broadcastable. Kept for parity checks and benchmarks.
    """
    return torch.matmul(torch.pinverse(normalize_rows(stack, eps)), normalize_rows(anchors, eps))
