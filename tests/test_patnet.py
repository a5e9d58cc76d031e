r"""PATNet: rank-2 closed form vs the pseudo-inverse, prototypes hook, parameters, gradients, K-shot, TFI, CLI."""
import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from common.errors import UserError
from model import Hooks, build_method
from model.base import EpisodeContext
from model.layers import (anchor_factor, dense_transform_matrix, multilayer_correlation, normalize_rows, pinv_sym2x2,
                          rank2_coefficients, resize_mask)
from model.patnet import PATNet, PATNetOptions

f64 = torch.float64


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    # These tests run many small ops; on the shared 2-core machine every multi-threaded op can stall waiting for a
    # descheduled worker, which made this file ~3x slower with 2 threads. Restored afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def patnet():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return build_method('patnet', 'resnet50', 'none').eval()


def dense_twin(model: PATNet) -> PATNet:
    twin = copy.deepcopy(model)
    twin.transform = 'pinv'
    return twin


def taps(model, q, s, m, cid):
    r"""The (hooked) query and support taps of the pipeline's encode stage."""
    record = model.encode(q, s, m, cid)
    return record.query_feats, record.support_feats


def infer(model, q, s, m, cid):
    r"""Per-shot logits through the test-time entry point (with test-time adaptation when enabled)."""
    return model.infer(model.encode(q, s, m, cid)).logits


def episode(b=2, k=1, size=64, seed=0, empty=None):
    r"""Random images and rectangular support masks; `empty` = (b, k) of a shot whose mask is all zero."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 3, size, size, generator=g)
    s = torch.randn(b, k, 3, size, size, generator=g)
    m = torch.zeros(b, k, size, size)
    for i in range(b):
        for j in range(k):
            y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
            h, w = torch.randint(size // 4, size // 2, (2,), generator=g).tolist()
            m[i, j, y:y + h, x:x + w] = 1
    if empty is not None:
        m[empty] = 0
    return q, s, m, torch.arange(b)


# --- the maths, float64 ------------------------------------------------------------------------------------------
def test_pinv_sym2x2_by_hand_and_against_linalg_pinv():
    hand = torch.tensor([[[2., 0.], [0., 0.]], [[1., 1.], [1., 1.]], [[0., 0.], [0., 0.]], [[2., 1.], [1., 2.]],
                         [[3., 0.], [0., 3.]]], dtype=f64)
    expected = torch.tensor([[[.5, 0.], [0., 0.]], [[.25, .25], [.25, .25]], [[0., 0.], [0., 0.]],
                             [[2 / 3, -1 / 3], [-1 / 3, 2 / 3]], [[1 / 3, 0.], [0., 1 / 3]]], dtype=f64)
    assert torch.allclose(pinv_sym2x2(hand), expected, atol=1e-15)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 2, 7, generator=g, dtype=f64)
    x[:50, 1] = 0                                                  # rank 1 (a zero row)
    x[50:100, 1] = 3 * x[50:100, 0]                                # rank 1 (parallel rows)
    x[100:150, 1] = x[100:150, 0] + 1e-5 * torch.randn(50, 7, generator=g, dtype=f64)   # nearly parallel
    gram = x @ x.transpose(1, 2)
    ours, ref = pinv_sym2x2(gram), torch.linalg.pinv(gram, hermitian=True)
    # Both carry float64 rounding amplified by the condition number of the kept spectrum (1 for rank 1).
    eig = torch.linalg.eigvalsh(gram)
    cond = torch.where(eig[:, 0] > 1e-12 * eig[:, 1], eig[:, 1] / eig[:, 0], torch.ones_like(eig[:, 0]))
    rel = (ours - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    assert (rel <= 1e-14 * cond + 1e-14).all(), (rel / cond).max()
    assert (ours[:100] - ref[:100]).abs().max() < 1e-14            # rank 1: G / tr(G)² is exact
    # Moore-Penrose conditions G G⁺ G = G and G⁺ G G⁺ = G⁺ (skipping the ill-conditioned block 100:150)
    keep = torch.cat([torch.arange(100), torch.arange(150, 200)])
    gk, ok = gram[keep], ours[keep]
    assert torch.allclose(gk @ ok @ gk, gk, rtol=1e-12, atol=1e-12)
    assert torch.allclose(ok @ gk @ ok, ok, rtol=1e-12, atol=1e-12)


def test_pinv_sym2x2_gradient_is_finite_at_equal_eigenvalues():
    g = torch.tensor([[[2., 0.], [0., 2.]], [[1., 0.], [0., 0.]]], dtype=f64, requires_grad=True)
    pinv_sym2x2(g).sum().backward()
    assert torch.isfinite(g.grad).all()
    x = torch.randn(3, 2, 5, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: pinv_sym2x2(v @ v.transpose(1, 2)), (x,))


@pytest.mark.parametrize('case', ['random', 'cos_0.9994', 'cos_1-1e-8', 'fg_zero', 'identical'])
def test_rank2_transform_equals_pinverse_formula(case):
    g = torch.Generator().manual_seed(2)
    n, c, hw = 4, 48, 30
    fg = torch.randn(n, c, generator=g, dtype=f64)
    bg = torch.randn(n, c, generator=g, dtype=f64)
    if case.startswith('cos'):          # nearly parallel, as real FP/BP are (cosine 0.9994-1.0000)
        sine = 0.035 if case == 'cos_0.9994' else 1.4e-4
        ortho = torch.randn(n, c, generator=g, dtype=f64)
        ortho = ortho - (ortho * fg).sum(1, keepdim=True) / (fg * fg).sum(1, keepdim=True) * fg
        bg = 5 * (fg + sine * fg.norm(dim=1, keepdim=True) * normalize_rows(ortho, 0))
    elif case == 'fg_zero':             # empty support mask: FP = 0, singular Gram
        fg = torch.zeros(n, c, dtype=f64)
    elif case == 'identical':
        bg = fg.clone()
    anchors = torch.randn(2, c, generator=g, dtype=f64)
    feats = torch.randn(n, c, hw, generator=g, dtype=f64)
    stack = torch.stack([bg, fg], dim=1)
    reference = dense_transform_matrix(stack, anchors).transpose(1, 2) @ feats                 # Pᵀ f
    closed = normalize_rows(anchors).transpose(0, 1) @ (rank2_coefficients(stack) @ feats)    # R̂ᵀ (G⁺ Ĉ f)
    # Forming the Gram squares the condition number: float64 rounding grows like kappa(Ĉ)² * 1e-16 (1e-8 relative
    # at cosine 1 - 1e-8, where fp32 prototypes are barely distinguishable; 1e-13 at the realistic 0.9994).
    sv = torch.linalg.svdvals(normalize_rows(stack))
    kappa2 = torch.where(sv[:, 1] > 1e-12 * sv[:, 0], (sv[:, 0] / sv[:, 1]) ** 2, torch.ones_like(sv[:, 0])).max()
    err = (closed - reference).norm() / reference.norm()
    assert err < 1e-13 + 1e-15 * kappa2, (err, kappa2)
    if case == 'fg_zero':
        # pinv([b; 0]) = [b/|b|², 0]: only the BG anchor row survives
        b = normalize_rows(bg)
        by_hand = normalize_rows(anchors)[0][None, :, None] * (b / (b * b).sum(1, keepdim=True)).unsqueeze(1).matmul(
            feats)
        assert torch.allclose(closed, by_hand, atol=1e-10)


def test_two_channel_cholesky_correlation_equals_expanded_correlation():
    g = torch.Generator().manual_seed(3)
    stage_ids = [2, 2, 3]
    anchors = [torch.randn(2, 64, generator=g, dtype=f64), torch.randn(2, 96, generator=g, dtype=f64)]
    sizes = [(6, 5), (6, 5), (3, 4)]
    qa = [torch.randn(3, 2, *s, generator=g, dtype=f64) for s in sizes]
    sa = [torch.randn(3, 2, *s, generator=g, dtype=f64) for s in sizes]
    sa[0][:, :, :2] = 0                    # masked-out support pixels: x / (||x|| + eps) must give exact zeros
    sa[2][1] = 0
    anchor_of = [0, 0, 1]
    expand = [normalize_rows(anchors[a]).transpose(0, 1) for a in anchor_of]
    big_q = [torch.einsum('ck,nkhw->nchw', r, x) for r, x in zip(expand, qa)]
    big_s = [torch.einsum('ck,nkhw->nchw', r, x) for r, x in zip(expand, sa)]
    lt = [anchor_factor(anchors[a]).transpose(0, 1) for a in anchor_of]
    small_q = [torch.einsum('jk,nkhw->njhw', t, x) for t, x in zip(lt, qa)]
    small_s = [torch.einsum('jk,nkhw->njhw', t, x) for t, x in zip(lt, sa)]
    # inner products and norms are preserved
    assert torch.allclose((small_q[0] * small_s[0]).sum(1), (big_q[0] * big_s[0]).sum(1), atol=1e-12)
    assert torch.allclose(small_q[2].norm(dim=1), big_q[2].norm(dim=1), atol=1e-12)
    expanded = multilayer_correlation(big_q, big_s, stage_ids)
    two = multilayer_correlation(small_q, small_s, stage_ids)
    for a, b in zip(expanded, two):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-12)
        assert a.max() > 0.5               # not vacuous: real, positive cosines


# --- the model ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_model_rank2_equals_pinv(patnet):
    dense = dense_twin(patnet)
    q, s, m, cid = episode(b=1, k=2, size=64, empty=(0, 1))           # shot 1: empty mask, FP = 0
    ctx = EpisodeContext(cid, 2, m.flatten(0, 1))
    with torch.no_grad():
        out_rank2, out_pinv = patnet(q, s, m, cid).logits, dense(q, s, m, cid).logits
        qf, sf = taps(patnet, q, s, m, cid)
        fg, bg = patnet.prototypes(sf, ctx)
        corr_rank2 = multilayer_correlation(*patnet.transform_maps(qf, sf, fg, bg, ctx), patnet.backbone.stage_ids)
        corr_pinv = multilayer_correlation(*dense.transform_maps(qf, sf, fg, bg, ctx), patnet.backbone.stage_ids)
    assert out_rank2.shape == (1, 2, 2, 64, 64) and torch.isfinite(out_rank2).all()
    assert (out_rank2 - out_pinv).abs().max() < 1e-4
    for a, b in zip(corr_rank2, corr_pinv):                   # what the learner sees: cosines in [0, 1]
        assert (a - b).abs().max() < 1e-4
    assert max(c.max() for c in corr_pinv) > 0.3              # not vacuous


@pytest.mark.slow
def test_full_model_rank2_equals_pinv_float64(patnet):
    model = copy.deepcopy(patnet).double()
    dense = dense_twin(model)
    q, s, m, cid = episode(b=1, k=2, size=64, seed=4, empty=(0, 1))
    q, s, m = q.double(), s.double(), m.double()
    with torch.no_grad():
        a, b = model(q, s, m, cid).logits, dense(q, s, m, cid).logits
        model.anchors[0].mul_(-1).add_(0.3 * torch.randn_like(model.anchors[0]))
        other = model(q, s, m, cid).logits
    assert (a - b).abs().max() < 1e-9 * max(1.0, b.abs().max().item())
    assert (a - other).abs().max() > 1e-6                      # the anchors matter 1000x more than the tolerance


@pytest.mark.slow
def test_output_depends_on_anchors_only_through_their_gram(patnet):
    # A property of the reference formulation itself (checked on the pinv path): correlations see
    # <R̂ᵀa, R̂ᵀb> = aᵀ(R̂R̂ᵀ)b, so rotating both anchor rows by any orthogonal Q leaves the output unchanged.
    model = dense_twin(copy.deepcopy(patnet).double())
    q, s, m, cid = (x.double() if x.is_floating_point() else x for x in episode(b=1, k=1, size=64, seed=13))
    with torch.no_grad():
        before = model(q, s, m, cid).logits
        rot, _ = torch.linalg.qr(torch.randn(512, 512, dtype=f64))
        model.anchors[0].copy_(model.anchors[0] @ rot)
        rotated = model(q, s, m, cid).logits
        model.anchors[0][1].copy_(model.anchors[0][0] + 0.5 * model.anchors[0][1])   # a different Gram
        changed = model(q, s, m, cid).logits
    assert torch.allclose(before, rotated, atol=1e-12)
    assert (before - changed).abs().max() > 1e-6


def test_unknown_transform_is_a_clear_error(patnet):
    with pytest.raises(UserError, match='transform'):
        PATNet(patnet.backbone, PATNetOptions(transform='svd'))


class RecordingHooks(Hooks):
    r"""Records what `prototypes` receives; optionally swaps FP and BP in what it returns."""

    def __init__(self, fuse: bool):
        super().__init__()
        self.fuse, self.calls = fuse, []

    def prototypes(self, fg, bg, feats, ctx):
        self.calls.append(([f.clone() for f in fg], [b.clone() for b in bg], feats, ctx))
        if not self.fuse:
            return fg, bg
        # as CD-TG: FP <- 0.7 FP + 0.3 FP_t (here a fixed random "text" prototype), the same for BP
        g = torch.Generator().manual_seed(0)
        text = [torch.randn(f.shape, generator=g) * f.norm(dim=-1, keepdim=True) / f.shape[-1] ** 0.5 for f in fg]
        return [0.7 * f + 0.3 * t for f, t in zip(fg, text)], [0.7 * b - 0.3 * t for b, t in zip(bg, text)]


def test_prototypes_hook_receives_map_prototypes_and_its_output_is_used(patnet):
    model = copy.deepcopy(patnet)
    q, s, m, cid = episode(b=1, k=2, size=64, seed=5)
    with torch.no_grad():
        plain = model(q, s, m, cid).logits
        rec = RecordingHooks(fuse=False)
        same = model.attach(rec)(q, s, m, cid).logits
        fused = model.attach(RecordingHooks(fuse=True))(q, s, m, cid).logits
        _, support_feats = taps(model, q, s, m, cid)
    assert len(rec.calls) == 1
    fg, bg, feats, ctx = rec.calls[0]
    assert len(fg) == len(bg) == 13 and fg[12].shape == (2, 1, 2048) and ctx.nshot == 2   # sets of one prototype
    assert all(torch.equal(a, b) for a, b in zip(feats, support_feats))     # unmasked support taps
    # FP / BP by hand (float64) on one tap: Σ F·m / (Σ m + 1e-6) with the mask resized bilinearly (aligned corners)
    tap = 5
    feat = support_feats[tap].double()
    mask = F.interpolate(m.flatten(0, 1)[:, None].double(), feat.shape[-2:], mode='bilinear', align_corners=True)
    fp = (feat * mask).sum((2, 3)) / (mask.sum((2, 3)) + 1e-6)
    bp = (feat * (1 - mask)).sum((2, 3)) / ((1 - mask).sum((2, 3)) + 1e-6)
    assert torch.allclose(fg[tap][:, 0].double(), fp, rtol=1e-5, atol=1e-6)
    assert torch.allclose(bg[tap][:, 0].double(), bp, rtol=1e-5, atol=1e-6)
    assert torch.equal(plain, same)                                          # identity hook: identical output
    assert (plain - fused).abs().max() > 1e-2 * plain.abs().max()            # P is built from the hook's output


@pytest.mark.slow
def test_parameters_resnet50(patnet):
    hsnet = build_method('hsnet', 'resnet50', None)
    learner = sum(p.numel() for p in hsnet.trainable_parameters())
    n = sum(p.numel() for p in patnet.trainable_parameters())
    assert n == learner + 2 * (512 + 1024 + 2048)
    assert round(n / 1e6, 3) == 2.581
    assert [tuple(a.shape) for a in patnet.anchors] == [(2, 512), (2, 1024), (2, 2048)]
    assert patnet.tap_anchor == [0] * 4 + [1] * 6 + [2] * 3
    # Kaiming-normal, fan-in, linear gain: std = 1/sqrt(C) (4096 samples for the last anchor: ±4 % at 3 sigma)
    assert abs(patnet.anchors[2].std().item() * 2048 ** 0.5 - 1) < 0.05
    assert all(not p.requires_grad for p in patnet.backbone.parameters())
    names = {name for name, p in patnet.named_parameters() if p.requires_grad}
    assert all(name.startswith(('learner.', 'anchors.')) for name in names)


@pytest.mark.parametrize('transform', ['rank2', 'pinv'])
@pytest.mark.slow
def test_gradients_reach_anchors_and_learner_not_backbone(patnet, transform):
    model = copy.deepcopy(patnet).train()
    model.transform = transform
    q, s, m, cid = episode(b=1, k=1, size=96, seed=6)
    # a large central mask: every stage keeps masked-in support pixels, so every stage's correlation (clamped at 0)
    # has positive entries and passes a gradient back to its anchor
    m.zero_()[..., 16:80, 16:80] = 1
    target = (torch.rand(1, 96, 96) > 0.5).long()
    loss = model.loss(model(q, s, m, cid), {'query_mask': target})['ce']
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in model.backbone.parameters())
    for a in model.anchors:
        assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    grads = [p.grad for p in model.learner.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_rank2_and_pinv_anchor_gradients_agree(patnet):
    q, s, m, cid = episode(b=1, k=1, size=64, seed=7)
    grads = []
    for model in (copy.deepcopy(patnet), dense_twin(patnet)):
        model(q, s, m, cid).logits[:, 0, 1].mean().backward()
        grads.append(torch.cat([a.grad.flatten() for a in model.anchors]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-2, atol=1e-3 * grads[1].abs().max())


def test_kshot_encodes_query_once_and_transforms_it_per_shot(patnet):
    model = copy.deepcopy(patnet)
    sizes = []
    handle = model.backbone.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[0]))
    q, s, m, cid = episode(b=2, k=2, size=64, seed=8)
    with torch.no_grad():
        out = model(q, s, m, cid).logits
        assert sizes == [2 + 2 * 2]                    # one pass: 2 queries + 4 supports
        for k in range(2):
            single = model(q, s[:, k:k + 1], m[:, k:k + 1], cid).logits
            assert torch.allclose(out[:, k], single[:, 0], atol=1e-5)
    handle.remove()


# --- test-time fine-tuning ------------------------------------------------------------------------------------
def test_tfi_pooled_transform_equals_transform_then_pool(patnet):
    model = copy.deepcopy(patnet).double()
    g = torch.Generator().manual_seed(9)
    feat = torch.randn(2, 512, 8, 8, generator=g, dtype=f64)
    fg, bg = torch.randn(2, 512, generator=g, dtype=f64), torch.randn(2, 512, generator=g, dtype=f64)
    pred = (torch.rand(2, 64, 64, generator=g) > 0.6).long()
    mask = resize_mask(pred, (8, 8), f64)
    maps = (dense_transform_matrix(torch.stack([bg, fg], 1), model.anchors[0]).transpose(1, 2)
            @ feat.flatten(2)).view_as(feat)                                    # PATM on the map
    pooled_after = (maps * mask).sum((2, 3)) / (mask.sum((2, 3)) + 1e-6)
    pooled = (feat * mask).sum((2, 3)) / (mask.sum((2, 3)) + 1e-6)
    for transform in ('rank2', 'pinv'):
        model.transform = transform
        assert torch.allclose(model.transform_vectors(pooled, fg, bg, tap=0), pooled_after, atol=1e-10)


def test_tfi_loss_reaches_only_the_layer2_anchor(patnet):
    model = copy.deepcopy(patnet)
    q, s, m, cid = episode(b=1, k=2, size=64, seed=10)
    ctx = EpisodeContext(cid, 2, m.flatten(0, 1))
    qf, sf = taps(model, q, s, m, cid)
    fg, bg = model.prototypes(sf, ctx)
    loss = model.tfi_loss(qf, fg, bg, (torch.rand(1, 64, 64) > 0.5).long(), nshot=2)
    grads = torch.autograd.grad(loss, list(model.anchors), allow_unused=True)
    assert loss > 0 and grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[1] is None and grads[2] is None


@pytest.mark.slow
def test_finetuning_changes_the_prediction_and_resets_every_episode(patnet):
    model = copy.deepcopy(patnet)
    e1, e2 = episode(b=1, k=1, size=64, seed=11), episode(b=1, k=1, size=64, seed=12)
    before = [a.detach().clone() for a in model.anchors]
    with torch.no_grad():
        plain = infer(model, *e1)
    model.set_test_time(finetune_steps=2, finetune_lr=0.05)
    with torch.no_grad():                      # as in engine.loops.evaluate
        tuned1 = infer(model, *e1)
        assert all(torch.equal(a, b) for a, b in zip(model.anchors, before))   # bit-identical after the episode
        assert all(a.grad is None for a in model.anchors)
        both = infer(model, *(torch.cat([x, y]) for x, y in zip(e1, e2)))   # e1 then e2 in one batch
        tuned2 = infer(model, *e2)
        again1 = infer(model, *e1)
    with torch.inference_mode():
        assert torch.equal(infer(model, *e1), tuned1)
    assert all(torch.equal(a, b) for a, b in zip(model.anchors, before))
    assert (tuned1 - plain).abs().max() > 1e-6                 # the adaptation does something
    assert torch.equal(tuned1, again1)                          # no state carried over from episode 2
    assert torch.allclose(both, torch.cat([tuned1, tuned2]), atol=1e-6)   # episodes of a batch adapt separately


def test_finetune_options_are_validated(patnet):
    model = copy.deepcopy(patnet)
    with pytest.raises(UserError, match='finetune-steps'):
        model.set_test_time(finetune_steps=-1)
    with pytest.raises(UserError, match='finetune-lr'):
        model.set_test_time(finetune_lr=0.0)
    assert model.adaptation.steps == 0 and model.adaptation.lr == 1e-3


# --- end to end --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_and_test_cli_with_patnet(datapath, tmp_path):
    import test as test_cli
    import train as train_cli
    run = tmp_path / 'patnet'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        out = train_cli.main(['--method', 'patnet', '--benchmark', 'synthetic', '--datapath', str(datapath),
                              '--backbone-weights', 'none', '--img-size', '64', '--bsz', '2', '--epochs', '1',
                              '--episodes-per-epoch', '2', '--val-episodes', '1', '--workers', '0',
                              '--transform', 'pinv', '--logpath', str(run)])
        assert out['best']['epoch'] == 0
        res = test_cli.main(['--load', str(run / 'best.pt'), '--benchmark', 'synthetic-med', '--datapath',
                             str(datapath), '--episodes', '2', '--workers', '0', '--finetune-steps', '2',
                             '--finetune-lr', '1e-3', '--logpath', str(tmp_path / 'test')])
    saved = json.loads((tmp_path / 'test' / 'results.json').read_text())
    assert saved['method'] == 'patnet' and len(saved['episodes']) == 2
    assert saved['method_options'] == {'transform': 'pinv'}                   # the option travels with the model
    assert saved['test_time_adaptation'] == {'steps': 2, 'lr': 1e-3}
    assert 0 <= res['miou'] <= 100 and res['miou'] == saved['miou']
