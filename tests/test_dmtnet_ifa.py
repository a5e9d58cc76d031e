r"""DMTNet and IFA: float64 re-derivations of the reference formulas (grid self-matching, doubly matching transform,
SSP and one BFP iteration with refinement), losses, recipes, test-time adaptation that uses only the supports and
resets, and one end-to-end CLI run per method (± CD-TG, synthetic and a medical fixture, 1 and 5 shots)."""
import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from common.constants import IGNORE_INDEX
from model import build_method
from model.base import EpisodeContext, EpisodeRecord, Output, SupportSet
from model.dmtnet import DMTNet, Prototypes, grid_cells, grid_loss, inverted_mask
from model.ifa import IFA, hsv_to_rgb, pseudo_query_augmentation, rgb_to_hsv, shift_hsv, similarity, ssp
from model.layers import cholesky_psd

f64 = torch.float64
SIZE = 64


pytestmark = pytest.mark.usefixtures('one_thread')     # many small ops: see conftest.one_thread


def make(name: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return build_method(name, None, 'none', **options).eval()


@pytest.fixture(scope='module')
def dmtnet() -> DMTNet:
    return make('dmtnet')


@pytest.fixture(scope='module')
def ifa() -> IFA:
    return make('ifa')


def episode(b=1, k=1, size=SIZE, seed=0):
    r"""Random images, rectangular support masks and a query mask with an ignored border."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 3, size, size, generator=g)
    s = torch.randn(b, k, 3, size, size, generator=g)
    m = torch.zeros(b, k, size, size)
    for i in range(b):
        for j in range(k):
            y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
            m[i, j, y:y + size // 2, x:x + size // 2] = 1
    qm = torch.zeros(b, size, size, dtype=torch.long)
    qm[:, size // 4:3 * size // 4, size // 4:3 * size // 4] = 1
    qm[:, :, :2] = IGNORE_INDEX
    return {'query_img': q, 'support_imgs': s, 'support_masks': m, 'query_mask': qm, 'class_id': torch.arange(b)}


def run(model, ep):
    return model(ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])


def nr(x, eps=1e-6):
    return x / (x.norm(dim=-1, keepdim=True) + eps)


# --- shared layer: small PSD Cholesky ------------------------------------------------------------------------------
def test_cholesky_psd_by_hand_against_linalg_and_on_singular_matrices():
    hand = torch.tensor([[4., 2.], [2., 2.]], dtype=f64)
    assert torch.equal(cholesky_psd(hand), torch.tensor([[2., 0.], [1., 1.]], dtype=f64))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 4, 6, generator=g, dtype=f64)
    pd = a @ a.transpose(1, 2)
    assert torch.allclose(cholesky_psd(pd), torch.linalg.cholesky(pd), atol=1e-12)
    a[:, 3] = 2 * a[:, 0] - a[:, 1]                                   # rank 3: a dependent row
    psd = a @ a.transpose(1, 2)
    low = cholesky_psd(psd)
    assert torch.allclose(low @ low.transpose(1, 2), psd, atol=1e-10)
    assert torch.all(low.triu(1) == 0) and low[:, 3, 3].abs().max() < 1e-6
    x = a.clone().requires_grad_(True)
    cholesky_psd(x @ x.transpose(1, 2)).sum().backward()
    assert torch.isfinite(x.grad).all()
    y = torch.randn(3, 4, 6, generator=g, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: cholesky_psd(v @ v.transpose(1, 2)), (y,))


# --- DMTNet: grid prototypes and query self-matching ----------------------------------------------------------------
def reference_get_index(i, j, k):
    r"""D:103-108, verbatim logic."""
    t = None
    for t in range(0, i - j + 1, k):
        yield t
    if t + j < i:
        yield i - j


def test_grid_cells_follow_the_reference_placement():
    # the reference's starts at 400x400 (taps 50, 25, 13) and a true 4x4 grid at 100 (notes §1.4)
    for side, first_rows in ((50, [0, 12, 24, 36, 38]), (25, [0, 6, 12, 18, 19]), (13, [0, 3, 6, 9, 10]),
                             (100, [0, 25, 50, 75])):
        cells = grid_cells(side, side, 4, torch.device('cpu')).view(-1, side, side)
        n = len(first_rows)
        assert cells.shape[0] == n * n
        assert [int(c.nonzero()[0, 0]) for c in cells[::n]] == first_rows          # row starts, h outer
        assert [int(c.nonzero()[0, 1]) for c in cells[:n]] == first_rows           # column starts, w inner
        assert all(int(c.sum()) == (side // 4) ** 2 for c in cells)
    for h, w in ((7, 11), (8, 8), (19, 5)):
        ref = [(a, b) for a in reference_get_index(h, h // 4, h // 4) for b in reference_get_index(w, w // 4, w // 4)]
        cells = grid_cells(h, w, 4, torch.device('cpu')).view(-1, h, w)
        assert [tuple(c.nonzero()[0].tolist()) for c in cells] == ref
    # below the grid size the reference divides by a zero step; cells of one pixel here
    assert grid_cells(2, 2, 4, torch.device('cpu')).shape == (4, 4)


def reference_query_prototypes(qf, sf, mask):
    r"""D:103-153 and D:323-357 for one tap and one support (float64 loops): grid FP/BP cells, the mean of
    10·cos over cells, argmax, and MAP on the pseudo-mask."""
    h, w = sf.shape[-2:]
    fg = F.interpolate(mask[None, None].to(f64), (h, w), mode='bilinear', align_corners=True)[0]
    bg = 1 - fg
    out = torch.zeros(2, h, w, dtype=f64)
    cells = [(a, b) for a in reference_get_index(h, h // 4, h // 4) for b in reference_get_index(w, w // 4, w // 4)]
    for a, b in cells:
        sl = (slice(None), slice(a, a + h // 4), slice(b, b + w // 4))
        fp = (sf * fg)[sl].sum((1, 2)) / (fg[sl].sum() + 1e-6)
        bp = (sf * bg)[sl].sum((1, 2)) / (bg[sl].sum() + 1e-6)
        out += 10 * torch.stack([F.cosine_similarity(qf, bp[:, None, None], dim=0),
                                 F.cosine_similarity(qf, fp[:, None, None], dim=0)])
    out /= len(cells)
    pred = out.argmax(0).to(f64)
    fp_q = (qf * pred).sum((1, 2)) / (pred.sum() + 1e-6)
    bp_q = (qf * (1 - pred)).sum((1, 2)) / ((1 - pred).sum() + 1e-6)
    return out, fp_q, bp_q


def test_query_self_matching_equals_the_reference_loops(dmtnet):
    g = torch.Generator().manual_seed(1)
    b, k, c, size = 2, 2, 16, 32
    sizes = [(10, 10), (7, 9)]                                        # overlapping last cells
    query = [torch.randn(b, c, h, w, generator=g, dtype=f64) for h, w in sizes]
    # support pixels correlated with the query: a non-trivial pseudo-mask
    support = [q.repeat_interleave(k, 0) + 0.8 * torch.randn(b * k, c, *q.shape[-2:], generator=g, dtype=f64)
               for q in query]
    masks = torch.zeros(b * k, size, size)
    masks[0, 4:20, 8:30] = 1
    masks[1, 10:32, 0:12] = 1
    masks[3, 0:16, 0:16] = 1                                          # support 2: empty mask (FP cells all 0)
    resized = {hw: F.interpolate(masks[:, None].to(f64), hw, mode='bilinear', align_corners=True) for hw in sizes}
    fg_q, bg_q, maps = dmtnet.query_prototypes(query, support, resized, k)
    for t in range(len(sizes)):
        for row in range(b * k):
            out, fp, bp = reference_query_prototypes(query[t][row // k], support[t][row], masks[row])
            assert torch.allclose(maps[t][row], out, atol=1e-12)
            assert torch.allclose(fg_q[t][row], fp, atol=1e-12) and torch.allclose(bg_q[t][row], bp, atol=1e-12)
    assert not maps[0].requires_grad


# --- DMTNet: the doubly matching transformation ---------------------------------------------------------------------
def transform_inputs(model, b, k, case, seed=2):
    g = torch.Generator().manual_seed(seed)
    widths = model.backbone.channels
    query = [torch.randn(b, c, 3, 3, generator=g, dtype=f64) for c in widths]
    support = [torch.randn(b * k, c, 3, 4, generator=g, dtype=f64) for c in widths]
    protos = [[torch.randn(b * k, c, generator=g, dtype=f64) for c in widths] for _ in range(4)]
    fg, bg, fg_q, bg_q = protos
    if case == 'degenerate':
        fg[0][0] = 0                                                   # support 0, tap 0: empty mask, FP = 0
        for t in range(len(fg_q)):
            fg_q[t][-1] = 0                                            # last support: empty pseudo-mask, FP_q = 0
    masks = {(3, 4): (torch.rand(b * k, 1, 3, 4, generator=g, dtype=f64) > 0.4).to(f64)}
    return query, support, masks, fg, bg, fg_q, bg_q


def cosines(q, s, eps=1e-5):
    r"""HSNet's correlation of one tap by hand: x/(|x|+eps), all pairs, clamped at 0."""
    q = q.flatten(2)
    s = s.flatten(2)
    q = q / (q.norm(dim=1, keepdim=True) + eps)
    s = s / (s.norm(dim=1, keepdim=True) + eps)
    return (q.transpose(1, 2) @ s).clamp(min=0)


@pytest.mark.parametrize('case', ['random', 'degenerate', 'dropout'])
@pytest.mark.slow
def test_query_side_transform_against_float64_pinv_formula(dmtnet, case):
    r"""Reference formula (pinv) vs the dense path (maps) and the closed form (correlations), float64; 'dropout' is
    K = 3 shots of one query in training mode (each shot transforms the query with its own P, P_q)."""
    model = copy.deepcopy(dmtnet).double()
    b, k = (1, 3) if case == 'dropout' else (2, 1)
    inputs = transform_inputs(model, b, k, case)
    query, support, masks, fg, bg, fg_q, bg_q = inputs
    if case == 'dropout':
        model.train()
    maps = {}
    for transform in ('rank4', 'pinv'):
        model.options.transform = transform
        torch.manual_seed(5)                                           # the same dropout draw for both
        maps[transform] = model.transform_maps_doubly(query, support, masks, Prototypes(fg, bg, fg_q, bg_q), k)
    torch.manual_seed(5)
    anchors = model.anchor_rows(b * k)
    for i in (0, 5, 12):                                               # one tap of each stage (the C x C maps are slow)
        stage = model.tap_anchor[i]
        r, r_q = anchors[stage]
        if case == 'dropout':
            j = model.stage_taps[stage].index(i)
            r, r_q = r[:, j], r_q[:, j]
            assert (r == 0).any() and not torch.equal(r[0], r[-1])    # per-row masks, really dropped
        # the reference's formula (D:199-226) with torch.linalg.pinv
        p = torch.linalg.pinv(nr(torch.stack([bg[i], fg[i]], 1))) @ nr(r)
        p_q = torch.linalg.pinv(nr(torch.stack([fg_q[i], bg_q[i]], 1))) @ nr(r_q)
        t_q = (0.5 * p_q + 0.5 * p).transpose(1, 2)                      # [B*K,C,C]
        q_ref = t_q @ query[i].repeat_interleave(k, 0).flatten(2)
        m = masks[(3, 4)]
        s_fg = p.transpose(1, 2) @ (support[i] * m).flatten(2)
        s_bg = p.transpose(1, 2) @ (support[i] * (1 - m)).flatten(2)
        dense_q, dense_s = maps['pinv'][0][i], maps['pinv'][1][i]
        assert torch.allclose(dense_q.flatten(2), q_ref, atol=1e-10)
        assert torch.allclose(dense_s[0::2].flatten(2), s_fg, atol=1e-10)
        assert torch.allclose(dense_s[1::2].flatten(2), s_bg, atol=1e-10)
        # the closed form: 4-channel maps, the same correlations
        z_q, z_s = maps['rank4'][0][i], maps['rank4'][1][i]
        assert z_q.shape[1] == 4 and z_s.shape[1] == 4
        for branch, ref in ((0, s_fg), (1, s_bg)):
            assert torch.allclose(cosines(z_q, z_s[branch::2]), cosines(q_ref, ref), atol=1e-10)
    if case == 'random':                                               # the test can fail: the query anchors act
        model.options.transform = 'rank4'
        model.query_anchors[0].data.mul_(-1).add_(0.1)
        other = model.transform_maps_doubly(query, support, masks, Prototypes(fg, bg, fg_q, bg_q), k)
        assert not torch.allclose(cosines(other[0][0], other[1][0][0::2]),
                                  cosines(maps['rank4'][0][0], maps['rank4'][1][0][0::2]))


def test_anchor_dropout_is_training_only(dmtnet):
    model = copy.deepcopy(dmtnet)
    ep = episode(b=1, k=2, seed=3)
    ep['support_masks'][0, 1] = 0                                      # one empty support
    with torch.no_grad():
        plain = run(model, ep).logits
        torch.manual_seed(0)
        assert torch.equal(run(model, ep).logits, plain)              # eval: no dropout, RNG-independent
        model.train()
        torch.manual_seed(4)
        t1 = run(model, ep).logits
        torch.manual_seed(4)
        t2 = run(model, ep).logits
        t3 = run(model, ep).logits
    assert torch.isfinite(t1).all() and torch.equal(t1, t2)
    assert not torch.allclose(t1, t3) and not torch.allclose(t1, plain)


def test_dmtnet_parameters_and_gradients(dmtnet):
    assert sum(p.numel() for p in dmtnet.trainable_parameters()) == 2_588_130     # as the reference
    assert [tuple(a.shape) for a in dmtnet.query_anchors] == [(2, 512), (2, 1024), (2, 2048)]
    model = copy.deepcopy(dmtnet).train()
    ep = episode(b=1, k=1, seed=4)
    terms = model.loss(run(model, ep), ep)
    assert set(terms) == {'fg', 'bg', 'grid_nograd'} and not terms['grid_nograd'].requires_grad
    sum(terms.values()).backward()
    for group in (model.anchors, model.query_anchors):
        assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in group)


# --- DMTNet: losses -------------------------------------------------------------------------------------------------
def test_background_branch_is_trained_on_the_inverted_mask(dmtnet):
    target = torch.tensor([[[0, 1, 255], [1, 1, 0]]])
    assert torch.equal(inverted_mask(target), torch.tensor([[[1, 0, 255], [0, 0, 1]]]))
    g = torch.Generator().manual_seed(0)
    logits, bg_logits = torch.randn(2, 1, 2, 2, 3, generator=g, dtype=f64).unbind(0)       # [B=1,2,H,W] each
    terms = dmtnet.loss(Output(logits[:, None], {'bg_logits': bg_logits[:, None]}), {'query_mask': target})

    def hand_ce(x, labels):                                           # −mean log p(label) over non-ignored pixels
        logp = x.log_softmax(dim=0)
        picked = [logp[labels[i, j], i, j] for i in range(2) for j in range(3) if labels[i, j] != 255]
        return -sum(picked) / len(picked)
    assert torch.allclose(terms['fg'], hand_ce(logits[0], target[0]))
    assert torch.allclose(terms['bg'], hand_ce(bg_logits[0], inverted_mask(target)[0]))
    assert not torch.allclose(terms['bg'], hand_ce(bg_logits[0], target[0]))
    assert set(dmtnet.loss(Output(logits[:, None]), {'query_mask': target})) == {'fg'}


def test_grid_loss_target_is_truncated_bilinear_with_ignore():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 1:, 1:] = 1
    target[0, 0, 3] = IGNORE_INDEX
    target[0, 1, 0] = 1                                                 # interpolates to 0.5 at (1, 0): truncated
    # 4 -> 3 with aligned corners samples rows/cols 0, 1.5, 3: only (1.5..3, 1.5..3) interpolate to exactly 1
    maps = [torch.randn(1, 2, 3, 3, dtype=f64)]
    expected = torch.tensor([[0, 0, 255], [0, 1, 1], [0, 1, 1]])      # the corner next to 255 is ignored
    logp = maps[0][0].log_softmax(0)
    valid = [(i, j) for i in range(3) for j in range(3) if expected[i, j] != 255]
    hand = -sum(logp[expected[i, j], i, j] for i, j in valid) / len(valid)
    assert torch.allclose(grid_loss(maps, target), hand)


# --- DMTNet: test-time self-finetuning ------------------------------------------------------------------------------
def test_tsf_tunes_the_two_groupnorm_weights_from_the_supports_only(dmtnet):
    model = copy.deepcopy(dmtnet)
    ep = episode(b=1, k=2, seed=6)
    record = model.encode(ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])
    params = model.adaptation_parameters(record)
    assert [tuple(p.shape) for p in params] == [(128,), (128,)]
    assert params[0] is model.learner.mix43[7].weight and params[1] is model.learner.mix32[7].weight
    loss = model.adaptation_loss(record, 0)
    # each support predicts itself: the same as K separate 1-shot episodes (support, support, mask)
    per_shot = []
    for j in range(2):
        s = ep['support_imgs'][:, j]
        out = model(s, s[:, None], ep['support_masks'][:, j:j + 1], ep['class_id'])
        per_shot.append(F.cross_entropy(out.logits[:, 0], ep['support_masks'][:, j].long()))
    assert torch.allclose(loss, sum(per_shot) / 2, atol=1e-5)
    changed = copy.copy(record)
    changed.query_img, changed.query_feats = record.query_img + 1, [f + 1 for f in record.query_feats]
    assert torch.equal(model.adaptation_loss(changed, 0), loss)          # no query input
    grads = torch.autograd.grad(loss, params)
    assert all(g.abs().sum() > 0 for g in grads)
    assert model.adaptation_defaults.steps == 0 and model.adaptation.lr == 1e-6


# --- IFA: SSP and one BFP iteration against the reference's loops ---------------------------------------------------
def reference_ssp(feature_q, out):
    r"""SSP_func (I:125-184) in float64, verbatim logic (per-episode loop, gathered pixels, norms without eps)."""
    bs, c = feature_q.shape[:2]
    pred = out.softmax(1).view(bs, 2, -1)
    fg_ls, bg_ls, bg_local_ls = [], [], []
    for epi in range(bs):
        cur = feature_q[epi].reshape(c, -1)
        f_h, f_w = feature_q[epi].shape[-2:]
        pf, pb = pred[epi, 1], pred[epi, 0]
        fg_feat = cur[:, pf > 0.7] if (pf > 0.7).sum() > 0 else cur[:, torch.topk(pf, 12).indices]
        bg_feat = cur[:, pb > 0.6] if (pb > 0.6).sum() > 0 else cur[:, torch.topk(pb, 12).indices]
        fg_ls.append(fg_feat.mean(-1))
        bg_ls.append(bg_feat.mean(-1))
        bg_norm = bg_feat / torch.norm(bg_feat, 2, 0, True)
        cur_norm = cur / torch.norm(cur, 2, 0, True)
        bg_sim = (cur_norm.t() @ bg_norm * 2.0).softmax(-1)
        bg_local_ls.append((bg_sim @ bg_feat.t()).t().view(c, f_h, f_w))
    return (torch.stack(fg_ls)[..., None, None], torch.stack(bg_ls)[..., None, None], torch.stack(bg_local_ls))


def reference_sim(feat, fp, bp):
    return torch.cat([F.cosine_similarity(feat, bp, dim=1)[:, None], F.cosine_similarity(feat, fp, dim=1)[:, None]],
                     dim=1) * 10.0


def reference_map(feature, mask):
    mask = F.interpolate(mask.unsqueeze(1), size=feature.shape[-2:], mode='bilinear', align_corners=True)
    return torch.sum(feature * mask, dim=(2, 3)) / (mask.sum(dim=(2, 3)) + 1e-5)


def reference_iter_bfp(fp, bp, fs, fq, refine, shot):
    r"""iter_BFP (I:199-280) for ONE episode (B = 1, so its shot-major and batch-major layouts coincide)."""
    ssfp1, ssbp1, asbp1 = reference_ssp(fq, reference_sim(fq, fp, bp))
    fp1, bp1 = fp * 0.5 + ssfp1 * 0.5, ssbp1 * 0.3 + asbp1 * 0.7
    out1 = reference_sim(fq, fp1, bp1)
    out_refine = None
    if refine:
        ssfp2, ssbp2, asbp2 = reference_ssp(fq, out1)
        fp2, bp2 = fp * 0.5 + ssfp2 * 0.5, ssbp2 * 0.3 + asbp2 * 0.7
        fp2 = fp * 0.5 + fp1 * 0.2 + fp2 * 0.3
        bp2 = bp * 0.5 + bp1 * 0.2 + bp2 * 0.3
        out_refine = reference_sim(fq, fp2, bp2) * 0.7 + out1 * 0.3
    fp_rep, fp1, bp1 = fp.repeat_interleave(shot, 0), fp1.repeat_interleave(shot, 0), bp1.repeat_interleave(shot, 0)
    ssfp, ssbp, asbp = reference_ssp(fs, reference_sim(fs, fp1, bp1))
    fp_s, bp_s = fp_rep * 0.5 + ssfp * 0.5, ssbp * 0.3 + asbp * 0.7
    supp_out1 = reference_sim(fs, fp_s, bp_s)
    return out_refine, out1, supp_out1, fp_s.mean(0, keepdim=True), bp_s.mean(0, keepdim=True)


def test_ssp_equals_the_reference_loop_including_the_top12_fallback():
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(3, 24, 6, 7, generator=g, dtype=f64)
    out = 4 * torch.randn(3, 2, 6, 7, generator=g, dtype=f64)
    out[1] = 0.01 * out[1]                                              # no pixel passes either threshold
    out[2, 1] = out[2, 0] - 0.2                                        # fg below 0.7 everywhere, bg passes
    ours, ref = ssp(feat, out), reference_ssp(feat, out)
    for a, r in zip(ours, ref):
        assert torch.allclose(a, r, atol=1e-12)
    p = out.softmax(1).flatten(2)
    assert (p[1] <= 0.6).all() and (p[2, 1] <= 0.7).all()             # the fallbacks really ran


def ifa_record(fq, fs, masks, size):
    b, k = masks.shape[:2]
    ctx = EpisodeContext(torch.zeros(b, dtype=torch.long), k, masks.flatten(0, 1))
    sup = SupportSet(torch.zeros(b, k, 3, size, size, dtype=f64), masks, [fs], ctx.class_id)
    return EpisodeRecord(torch.zeros(b, 3, size, size, dtype=f64), [fq], sup, ctx)


def test_one_refinement_iteration_and_the_support_pass_equal_the_reference(ifa):
    g = torch.Generator().manual_seed(4)
    b, k, c, h, size = 2, 2, 32, 8, 32
    fq = torch.randn(b, c, h, h, generator=g, dtype=f64)
    fs = fq.repeat_interleave(k, 0) + torch.randn(b * k, c, h, h, generator=g, dtype=f64)
    masks = torch.zeros(b, k, size, size, dtype=f64)
    for i in range(b):
        for j in range(k):
            masks[i, j, 4 * j:20 + 4 * i, 6:26 - 3 * j] = 1
    record = ifa_record(fq, fs, masks, size)
    test_out = ifa.mine(record, iterations=1, support_pass=False)
    train_out = ifa.mine(record, iterations=3, support_pass=True)
    up = lambda x: F.interpolate(x, (size, size), mode='bilinear', align_corners=True)   # noqa: E731
    for i in range(b):                                                 # the reference, episode by episode
        rows = slice(i * k, (i + 1) * k)
        fp = torch.stack([reference_map(fs[i * k + j:i * k + j + 1], masks[i, j:j + 1]) for j in range(k)]).mean(0)
        bp = torch.stack([reference_map(fs[i * k + j:i * k + j + 1], 1 - masks[i, j:j + 1])
                          for j in range(k)]).mean(0)
        fp, bp = fp[..., None, None], bp[..., None, None]
        refined, out1, supp1, fp_n, bp_n = reference_iter_bfp(fp, bp, fs[rows], fq[i:i + 1], True, k)
        assert torch.allclose(test_out.logits[i], up(refined)[0], atol=1e-10)
        assert torch.allclose(train_out.logits[i], up(refined)[0], atol=1e-10)
        aux = train_out.aux
        assert torch.allclose(aux['iter1'][i], up(out1)[0], atol=1e-10)
        assert torch.allclose(aux['support_iter1'][rows], up(supp1), atol=1e-10)
        for later in aux['later']:                                     # iterations 2 and 3: no refinement
            _, out_n, supp_n, fp_n, bp_n = reference_iter_bfp(fp_n, bp_n, fs[rows], fq[i:i + 1], False, k)
            assert torch.allclose(later[0][i], up(out_n)[0], atol=1e-10)
            assert torch.allclose(later[1][rows], up(supp_n), atol=1e-10)
        own = [reference_sim(fs[i * k + j:i * k + j + 1], reference_map(fs[i * k + j:i * k + j + 1],
                                                                          masks[i, j:j + 1])[..., None, None],
                             reference_map(fs[i * k + j:i * k + j + 1], 1 - masks[i, j:j + 1])[..., None, None])
               for j in range(k)]
        assert torch.allclose(aux['support'][rows], up(torch.cat(own)), atol=1e-10)
    assert len(train_out.aux['later']) == 2 and not test_out.aux


def test_similarity_equals_cosine_similarity():
    g = torch.Generator().manual_seed(5)
    feat = torch.randn(2, 16, 5, 5, generator=g)
    fp, bp = torch.randn(2, 16, 1, 1, generator=g), torch.randn(2, 16, 5, 5, generator=g)
    assert torch.allclose(similarity(feat, fp, bp), reference_sim(feat, fp, bp), atol=1e-5)


# --- IFA: model, losses, recipe, adaptation -------------------------------------------------------------------------
def test_ifa_backbone_parameters_and_losses(ifa):
    assert sum(p.numel() for p in ifa.trainable_parameters()) == 8_290_304         # layer2/3 convs, as the reference
    assert all(name.startswith(('backbone.net.layer2.', 'backbone.net.layer3.')) and 'bn' not in name
               and 'downsample.1' not in name for name, p in ifa.named_parameters() if p.requires_grad)
    model = copy.deepcopy(ifa).train()
    ep = episode(b=1, k=2, seed=7)
    record = model.encode(ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])
    feat = record.query_feats[0]
    assert feat.shape == (1, 1024, SIZE // 8, SIZE // 8) and (feat < 0).any()      # stride 8, no last ReLU
    out = model.match(record)
    terms = model.loss(out, ep)
    assert set(terms) == {'refined', 'iter1', 'self', 'support', 'support_iter1'}   # source loss: iteration 1
    support = ep['support_masks'].flatten(0, 1).long()
    assert torch.allclose(terms['support'], 0.2 * F.cross_entropy(out.aux['support'], support))
    assert torch.allclose(terms['support_iter1'], 0.4 * F.cross_entropy(out.aux['support_iter1'], support))
    # the self term: the query from its own ground-truth prototypes (255 counts for neither)
    q = ep['query_mask']
    fp = reference_map(feat, (q == 1).float())[..., None, None]
    bp = reference_map(feat, (q == 0).float())[..., None, None]
    self_out = F.interpolate(reference_sim(feat, fp, bp), (SIZE, SIZE), mode='bilinear', align_corners=True)
    assert torch.allclose(terms['self'], F.cross_entropy(self_out, q, ignore_index=IGNORE_INDEX), atol=1e-5)
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())


def test_ifa_recipe_is_sgd_with_two_lr_drops(ifa):
    recipe = ifa.configure_optimizers(total_steps=30)
    group = recipe.optimizer.param_groups[0]
    assert isinstance(recipe.optimizer, torch.optim.SGD)
    assert (group['lr'], group['momentum'], group['weight_decay']) == (1e-3, 0.9, 5e-4)
    lrs = []
    for _ in range(30):
        lrs.append(recipe.optimizer.param_groups[0]['lr'])
        recipe.scheduler.step()
    assert lrs[9] == 1e-3 and lrs[10] == pytest.approx(1e-4) and lrs[20] == pytest.approx(1e-5)
    reference = make('ifa', milestones='reference').configure_optimizers(total_steps=30)
    assert reference.scheduler.milestones == {666: 1, 1333: 1}


def test_pseudo_query_augmentation_is_deterministic_and_keeps_image_and_mask_aligned():
    mask = torch.zeros(SIZE, SIZE)
    mask[5:30, 10:50] = 1
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    img = ((0.1 + 0.8 * mask).expand(3, -1, -1) - mean) / std               # raw intensities 0.1 (bg), 0.9 (fg)
    seen = set()
    for step in range(12):
        a, ma = pseudo_query_augmentation(img, mask, torch.Generator().manual_seed(step))
        b, mb = pseudo_query_augmentation(img, mask, torch.Generator().manual_seed(step))
        assert torch.equal(a, b) and torch.equal(ma, mb)
        raw = a * std + mean
        assert torch.equal(raw[0] > 0.42, ma > 0.5)                      # monotone photometric change, same geometry
        seen.add(ma.numpy().tobytes())
    assert len(seen) > 3
    wide = torch.zeros(3, 16, 32)
    out, m = pseudo_query_augmentation(wide, torch.zeros(16, 32), torch.Generator().manual_seed(0))
    assert out.shape == wide.shape and m.shape == (16, 32)


def test_hsv_shift_against_colorsys_and_by_hand():
    import colorsys
    rgb = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    hsv = rgb_to_hsv(rgb)
    for y, x in ((0, 0), (2, 3), (4, 6)):                                 # the standard library's conversion
        assert torch.allclose(hsv[:, y, x], torch.tensor(colorsys.rgb_to_hsv(*rgb[:, y, x].tolist()),
                                                         dtype=torch.float64), atol=1e-12)
    assert torch.allclose(hsv_to_rgb(hsv), rgb, atol=1e-12)
    assert torch.allclose(shift_hsv(rgb, 0, 0, 0), rgb, atol=1e-12)
    pixel = lambda *c: torch.tensor(c, dtype=torch.float64).view(3, 1, 1)      # noqa: E731
    assert torch.allclose(shift_hsv(pixel(1, 0, 0), 30, 0, 0), pixel(1, 1, 0), atol=1e-12)   # 30/180 = 60 degrees
    assert torch.allclose(shift_hsv(pixel(1, 0, 0), -30, 0, 0), pixel(1, 0, 1), atol=1e-12)  # wraps around
    assert torch.allclose(shift_hsv(pixel(1, 0.5, 0.5), 0, 25.5, 0), pixel(1, 0.4, 0.4), atol=1e-12)
    assert torch.allclose(shift_hsv(pixel(1, 0.5, 0.5), 0, 0, -25.5), pixel(0.9, 0.45, 0.45), atol=1e-12)
    assert torch.allclose(shift_hsv(pixel(0.2, 0.2, 0.2), 0, 0, 255), pixel(1, 1, 1), atol=1e-12)      # clipped


@pytest.mark.slow
def test_ifa_adaptation_uses_only_the_supports_and_resets(ifa):
    model = copy.deepcopy(ifa)
    ep = episode(b=1, k=2, seed=8)
    record = model.encode(ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])
    loss = model.adaptation_loss(record, step=0)
    changed = copy.copy(record)
    changed.query_img = torch.randn_like(record.query_img)
    changed.query_feats = [torch.randn_like(record.query_feats[0])]
    assert torch.equal(model.adaptation_loss(changed, step=0), loss)
    params = model.adaptation_parameters(record)
    assert sum(p.numel() for p in params) == 8_290_304
    assert isinstance(model.adaptation_optimizer(params), torch.optim.SGD)
    before = {key: v.clone() for key, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model.infer(record).logits
    model.set_test_time(finetune_steps=2, finetune_lr=1e-2)
    with torch.no_grad():
        adapted = model.infer(record).logits
        again = model.infer(record).logits
    assert (adapted - plain).abs().max() > 1e-6 and torch.equal(adapted, again)
    assert all(torch.equal(before[key], v) for key, v in model.state_dict().items())


# --- end to end ------------------------------------------------------------------------------------------------------
def _cli_run(method, datapath, tmp_path, adapt_lr):
    r"""Train `method` and `method` + CD-TG for two episodes on synthetic; test on synthetic-med and a WBC fixture,
    1 and 5 shots, with and without test-time adaptation, which must not depend on --bsz."""
    import test as test_cli
    import train as train_cli
    from fixtures_targets import write_wbc
    write_wbc(tmp_path / 'data')
    train = ['--method', method, '--benchmark', 'synthetic', '--datapath', str(datapath), '--backbone-weights', 'none',
             '--img-size', str(SIZE), '--bsz', '2', '--epochs', '1', '--episodes-per-epoch', '2', '--val-episodes', '1',
             '--workers', '0']
    # a 64-d shared alignment space: a small plug-in, so tiny runs stay fast
    cdtg = ['--cdtg', '--clip', 'ViT-B-32', '--clip-weights', 'none', '--cdtg-width', '64']
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for name, extra in (('plain', []), ('cdtg', cdtg)):
            train_cli.main(train + extra + ['--logpath', str(tmp_path / name)])

        def test(name, bench, shots, bsz=1, steps=0):
            data = tmp_path / 'data' if bench == 'wbc' else datapath
            args = ['--load', str(tmp_path / name / 'best.pt'), '--benchmark', bench, '--datapath', str(data),
                    '--nshot', str(shots), '--episodes', '2', '--workers', '0', '--bsz', str(bsz),
                    '--logpath', str(tmp_path / f'{name}-{bench}-{shots}-{bsz}-{steps}')]
            if steps:
                args += ['--finetune-steps', str(steps), '--finetune-lr', str(adapt_lr)]
            return test_cli.main(args)
        results['plain-med-1-tta'] = test('plain', 'synthetic-med', 1, bsz=1, steps=2)
        results['plain-med-1-tta-bsz2'] = test('plain', 'synthetic-med', 1, bsz=2, steps=2)
        results['plain-wbc-5'] = test('plain', 'wbc', 5)
        results['cdtg-med-5'] = test('cdtg', 'synthetic-med', 5)
        results['cdtg-wbc-1-tta'] = test('cdtg', 'wbc', 1, steps=1)
    for key, res in results.items():
        assert res['method'] == method and 0 <= res['miou'] <= 100, key
        assert (res['plugin'] is not None) == key.startswith('cdtg'), key
    assert results['plain-med-1-tta']['test_time_adaptation']['steps'] == 2
    tta, tta2 = results['plain-med-1-tta'], results['plain-med-1-tta-bsz2']
    assert tta['episodes'] == tta2['episodes'] and tta['per_class'] == tta2['per_class']   # --bsz does not matter
    saved = json.loads((tmp_path / 'plain-wbc-5-1-0' / 'results.json').read_text())
    assert saved['nshot'] == 5 and set(saved['per_class']) == {'nucleus', 'cytoplasm'}
    return results


@pytest.mark.slow
def test_dmtnet_cli_end_to_end(datapath, tmp_path):
    _cli_run('dmtnet', datapath, tmp_path, adapt_lr=0.05)


@pytest.mark.slow
def test_ifa_cli_end_to_end(datapath, tmp_path):
    _cli_run('ifa', datapath, tmp_path, adapt_lr=1e-3)
