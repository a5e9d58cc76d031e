r"""PMMs / RPMMs and Q-Net: EM, probability map, dense comparison, threshold, probability, losses and refinement
against float64 hand computations of the reference formulas; deterministic EM; batch indexing; recipes; parameter
counts; the CD-TG plug-in points; end-to-end runs (synthetic, a medical fixture, CHAOS volumetric)."""
import json
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import test as test_cli
import train as train_cli
from model import Hooks, build_method
from model.pmms import (KAPPA, LR_MULT, dense_comparison, em_init, em_prototypes, l2_normalize, poly_schedule,
                        probability_map)
from model.qnet import (BG_WEIGHT, SCALE, log_upsample, mixture_log_probabilities, path_logit, refinement_loss,
                        upsampled_average_pooling)

LOG_EPS = torch.finfo(torch.float32).eps              # the reference clamps probabilities to [eps, 1 - eps]

f64 = torch.float64
SIZE = 64


pytestmark = pytest.mark.usefixtures('one_thread')     # many small ops: see conftest.one_thread


def make(name: str, backbone: str | None = None, seed: int = 0, **options):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = build_method(name, backbone, 'none', **options).eval()
    model.backbone.calibrate_bn([torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))])
    return model


def episode(b: int = 2, k: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(b, k + 1, SIZE, SIZE)
    for i in range(b):
        for j in range(k + 1):
            y, x = torch.randint(0, SIZE // 2, (2,), generator=g).tolist()
            h, w = torch.randint(SIZE // 4, SIZE // 2, (2,), generator=g).tolist()
            masks[i, j, y:y + h, x:x + w] = 1
    query_mask = masks[:, 0].long()
    query_mask[:, :2] = 255                                            # a void border row
    return {'query_img': torch.randn(b, 3, SIZE, SIZE, generator=g),
            'support_imgs': torch.randn(b, k, 3, SIZE, SIZE, generator=g), 'support_masks': masks[:, 1:],
            'query_mask': query_mask, 'class_id': torch.arange(b) % 4}


def run(model, ep):
    return model(ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])


def record(model, ep):
    return model.encode(ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])


# --- PMMs: the maths, float64 ------------------------------------------------------------------------------------
def hand_em(x, mu0, iters, kappa):
    r"""The reference EM written out with Python loops over pixels and components, float64."""
    n_set, c, n = x.shape
    k = mu0.shape[1]
    out = torch.zeros(n_set, k, c, dtype=f64)
    for s in range(n_set):
        mu = [mu0[:, j].clone() for j in range(k)]
        for _ in range(iters):
            z = []
            for p in range(n):
                logits = [kappa * float(x[s, :, p] @ mu[j]) for j in range(k)]
                top = max(logits)
                e = [math.exp(v - top) for v in logits]
                z.append([v / sum(e) for v in e])
            new = []
            for j in range(k):
                total = sum(z[p][j] for p in range(n))
                m = sum(x[s, :, p] * (z[p][j] / (1e-6 + total)) for p in range(n))
                new.append(m / (1e-6 + m.norm()))
            mu = new
        out[s] = torch.stack(mu)
    return out


def test_em_equals_a_float64_hand_rolled_em():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 4, 9, generator=g, dtype=f64) * 0.15           # κ xᵀμ of order 1: soft responsibilities
    x[:, :, :3] = 0                                                    # masked-out pixels (zero vectors)
    mu0 = l2_normalize(torch.randn(4, 3, generator=g, dtype=f64), dim=0)
    ours = em_prototypes(x, mu0, iters=10, kappa=KAPPA)
    hand = hand_em(x, mu0, 10, KAPPA)
    assert ours.shape == (2, 3, 4) and torch.allclose(ours, hand, atol=1e-12)
    assert not torch.allclose(hand_em(x, mu0, 2, KAPPA), hand, atol=1e-6)        # the iterations matter
    assert torch.allclose(em_prototypes(x.float(), mu0.float()).double(), hand, atol=1e-5)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(2, 3, dtype=f64), atol=1e-4)   # up to the 1e-6 epsilon


def test_em_with_one_component_is_the_normalised_masked_sum_whatever_the_init():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 8, 20, generator=g, dtype=f64)
    expected = x.sum(dim=2) / (1e-6 + x.sum(dim=2).norm(dim=1, keepdim=True))
    for seed in range(3):
        mu0 = em_init(8, 1, torch.Generator().manual_seed(seed)).double()
        assert torch.allclose(em_prototypes(x, mu0)[:, 0], expected, atol=1e-12)


@pytest.mark.slow
def test_em_init_is_a_seeded_unit_buffer_saved_with_the_weights():
    a, b = make('rpmms', seed=0), make('rpmms', seed=1)               # other global seeds, same --em-seed
    c = make('rpmms', seed=0, em_seed=3)
    for k in (1, 3, 6):
        key = f'em_init_{k}'
        assert key in a.state_dict() and a.state_dict()[key].shape == (256, k)
        assert torch.equal(a.state_dict()[key], b.state_dict()[key])
        assert torch.allclose(a.state_dict()[key].norm(dim=0), torch.ones(k), atol=1e-5)
        if k > 1:
            assert not torch.allclose(a.state_dict()[key], c.state_dict()[key])
    # no randomness left in an evaluation forward: the same output whatever the global RNG state
    ep = episode(b=1, k=2)
    with torch.no_grad():
        torch.manual_seed(123)
        first = run(a, ep).logits
        torch.manual_seed(456)
        assert torch.equal(first, run(a, ep).logits)


def test_kshot_joint_em_equals_em_on_the_spatially_concatenated_supports():
    model = make('pmms')
    ep = episode(b=2, k=3, seed=2)
    with torch.no_grad():
        rec = record(model, ep)
        support = model.fuse(torch.cat(rec.support_feats, dim=1))                     # [B*K,256,h,w]
        fg, bg = model.prototypes(support, rec)
        h, w = support.shape[-2:]
        mu0 = model.em_init_3
        for i in range(2):
            # the reference's forward_5shot: features and bilinear-resized masks concatenated along H, one EM
            feats = torch.cat([support[i * 3 + j] for j in range(3)], dim=1)            # [256,3h,w]
            masks = torch.cat([F.interpolate(ep['support_masks'][i, j][None, None], (h, w), mode='bilinear',
                                             align_corners=True)[0] for j in range(3)], dim=1)
            ref_fg = em_prototypes((masks * feats).flatten(1)[None], mu0)
            ref_bg = em_prototypes(((1 - masks) * feats).flatten(1)[None], mu0)
            assert torch.allclose(fg[0][i], ref_fg[0], atol=1e-5) and torch.allclose(bg[0][i], ref_bg[0], atol=1e-5)


def test_probability_map_by_hand_and_its_gradient_reaches_only_the_prototypes():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 5, 3, 4, generator=g, dtype=f64, requires_grad=True)
    fg = torch.randn(2, 2, 5, generator=g, dtype=f64, requires_grad=True)
    bg = torch.randn(2, 2, 5, generator=g, dtype=f64, requires_grad=True)
    prob = probability_map(q, fg, bg)
    values = prob.detach()
    for n in range(2):
        for y in range(3):
            for x in range(4):
                s = [math.exp(float(q[n, :, y, x].detach() @ p.detach())) for p in torch.cat([fg[n], bg[n]])]
                assert float(values[n, 1, y, x]) == pytest.approx(sum(s[:2]) / sum(s), abs=1e-12)   # foreground
                assert float(values[n, 0, y, x]) == pytest.approx(sum(s[2:]) / sum(s), abs=1e-12)   # first: bg
    prob[:, 1].sum().backward()
    assert q.grad is None                                              # the reference: no gradient to the query
    assert fg.grad.abs().sum() > 0 and bg.grad.abs().sum() > 0        # fused (text) prototypes: a path


def test_dense_comparison_equals_the_convolution_of_each_concatenation():
    g = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(2 * 6, 5, 3, padding=2, dilation=2).double()
    q = torch.randn(2, 6, 5, 7, generator=g, dtype=f64, requires_grad=True)
    protos = torch.randn(2, 3, 6, generator=g, dtype=f64, requires_grad=True)
    ours = dense_comparison(conv, q, protos)
    naive = torch.stack([conv(torch.cat([q, protos[:, i, :, None, None].expand(-1, -1, 5, 7)], dim=1))
                         for i in range(3)], dim=1)
    assert ours.shape == (2, 3, 5, 5, 7) and torch.allclose(ours, naive, atol=1e-12)
    w = torch.randn(naive.shape, generator=g, dtype=f64)
    grads = torch.autograd.grad((ours * w).sum(), [q, protos, conv.weight, conv.bias])
    naive_grads = torch.autograd.grad((naive * w).sum(), [q, protos, conv.weight, conv.bias])
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(grads, naive_grads))


@pytest.mark.slow
def test_rpmms_cascade_loss_terms_and_the_prediction_is_the_last_stage():
    model = make('rpmms').train()
    ep = episode(b=2, k=1, seed=5)
    torch.manual_seed(0)
    out = run(model, ep)
    assert len(out.aux['stages']) == 2 and all(s.shape == out.logits.shape for s in out.aux['stages'])
    terms = model.loss(out, ep)
    assert set(terms) == {'ce', 'ce_stage1', 'ce_stage2'}
    for name, logits in zip(('ce_stage1', 'ce_stage2', 'ce'), out.aux['stages'] + [out.logits]):
        assert torch.allclose(terms[name], F.cross_entropy(logits, ep['query_mask'], ignore_index=255))
    assert not torch.allclose(out.aux['stages'][0], out.logits)
    pmms = make('pmms')
    assert set(pmms.loss(run(pmms, ep), ep)) == {'ce'}
    assert [k for k in pmms.state_dict() if k.startswith('em_init')] == ['em_init_3']


def test_pmms_recipe_parameter_groups_and_poly_schedule():
    model = make('pmms')
    recipe = model.configure_optimizers(lr=1e-3, total_steps=10)
    groups = recipe.optimizer.param_groups
    # torchvision convolutions have no bias and the backbone BatchNorm is frozen: the backbone-bias group is empty
    assert [g['name'] for g in groups] == ['backbone_weight', 'weight', 'bias']
    assert [g['lr'] for g in groups] == pytest.approx([1e-3 * LR_MULT[g['name']] for g in groups])
    assert all(g['momentum'] == 0.9 and g['weight_decay'] == 5e-4 for g in groups)
    backbone = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert {id(p) for p in groups[0]['params']} == backbone
    assert sum(len(g['params']) for g in groups) == len(model.trainable_parameters())
    for step in range(1, 11):
        recipe.optimizer.step()
        recipe.scheduler.step()
        assert groups[2]['lr'] == pytest.approx(20e-3 * (1 - step / 10) ** 0.9, abs=1e-12)
    assert poly_schedule(4)(2) == pytest.approx(0.5 ** 0.9)


@pytest.mark.slow
def test_learnable_parameter_counts_against_hand_counts_of_the_reference():
    # Hand counts of the reference networks (FPMMs / FRPMMs with a ResNet-50 up to layer3; Q-Net's encoder with the
    # ResNet-101 fc, reduce1/2 and reduce1d), see docs/methods.md: all parameters, and the learnable ones here
    # (the PMMs reference freezes the backbone's BatchNorm affine parameters; Q-Net's trains them, `--bn frozen` not).
    counts = {}
    for name, backbone, options in (('pmms', None, {}), ('rpmms', None, {}), ('qnet', 'resnet101', {}),
                                    ('qnet', 'resnet50', {}), ('qnet', 'resnet50', {'bn': 'frozen'})):
        model = make(name, backbone, **options)
        bn = sum(p.numel() for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
        total = sum(p.numel() for p in model.parameters())
        learnable = sum(p.numel() for p in model.trainable_parameters())
        assert learnable == (total if name == 'qnet' and not options else total - bn)
        counts[name, backbone] = total, learnable
    assert counts['pmms', None] == (19_629_890, 19_599_298)
    assert counts['rpmms', None] == (19_632_962, 19_602_370)
    assert counts['qnet', 'resnet101'] == (46_123_025, 46_123_025)
    assert counts['qnet', 'resnet50'][0] == 25_557_032 + (1024 + 2048) * 512 + 1001


# --- Q-Net: the maths, float64 -------------------------------------------------------------------------------------
def test_upsampled_pooling_equals_pooling_after_bilinear_upsampling():
    g = torch.Generator().manual_seed(6)
    feat = torch.randn(3, 4, 5, 7, generator=g, dtype=f64)
    mask = (torch.rand(3, 37, 41, generator=g) > 0.6).to(f64)
    mask[2] = 0                                                        # an empty mask: 0 / 1e-5
    up = F.interpolate(feat, (37, 41), mode='bilinear', align_corners=False)
    expected = (up * mask[:, None]).sum(dim=(2, 3)) / (mask.sum(dim=(1, 2))[:, None] + 1e-5)
    assert torch.allclose(upsampled_average_pooling(feat, mask), expected, atol=1e-12)


@pytest.mark.slow
def test_threshold_and_probability_against_hand_computation():
    model = make('qnet', 'resnet50').double()
    ep = {k: v.double() if v.is_floating_point() else v for k, v in episode(b=2, k=2, seed=7).items()}
    with torch.no_grad():
        model.threshold_head.weight.mul_(0.1)                          # T of a few units: p away from 0 and 1
        model.threshold_head.bias.fill_(-12.0)
        rec = record(model, ep)
        out = model.match(rec)
        # T = reduce1d(fc(avgpool(layer4 of the query)))
        pooled = rec.query_feats[1].mean(dim=(2, 3))
        fc, head = model.backbone.net.fc, model.threshold_head
        t = (pooled @ fc.weight.T + fc.bias) @ head.weight.T + head.bias                    # [B,1]
        probs = []
        for n, (reduce, qf, sf) in enumerate(zip(model.reduce, rec.query_feats, rec.support_feats)):
            q = torch.einsum('oc,bchw->bohw', reduce.weight[:, :, 0, 0], qf)
            s = torch.einsum('oc,bchw->bohw', reduce.weight[:, :, 0, 0], sf)
            up = F.interpolate(s, (SIZE, SIZE), mode='bilinear', align_corners=False)
            m = ep['support_masks'].flatten(0, 1)[:, None]
            fp = ((up * m).sum(dim=(2, 3)) / (m.sum(dim=(2, 3)) + 1e-5)).view(2, 2, -1).mean(dim=1)   # shot mean
            cos = (q * fp[:, :, None, None]).sum(1) / (q.norm(dim=1) * fp.norm(dim=1)[:, None, None])
            p = 1 - 1 / (1 + torch.exp(-0.5 * (-SCALE * cos - t[:, :, None])))                # the reference
            probs.append(F.interpolate(p[:, None], (SIZE, SIZE), mode='bilinear', align_corners=True)[:, 0])
        p = 0.9 * probs[0] + 0.1 * probs[1]
    assert torch.allclose(model.threshold(rec.query_feats), t[:, 0], atol=1e-10)
    # the reference's output, log(clamp([1 - p, p])), where nothing is clamped
    assert torch.allclose(out.logits, torch.stack([1 - p, p], 1).clamp(LOG_EPS, 1 - LOG_EPS).log(), atol=1e-9)
    assert 0.05 < float(p.mean()) < 0.95 and float(p.std()) > 0.01     # not saturated: the test can fail
    cos = torch.tensor([[[0.3, -0.2]]], dtype=f64)
    assert torch.allclose(torch.sigmoid(path_logit(cos, torch.tensor([1.5], dtype=f64))),
                          1 - torch.sigmoid(0.5 * (-20 * cos - 1.5)), atol=1e-15)


def test_log_probabilities_equal_the_reference_and_keep_a_gradient_where_it_clamps():
    g = torch.Generator().manual_seed(15)
    xs = [torch.randn(2, 5, 6, generator=g, dtype=f64) * 4, torch.randn(2, 3, 4, generator=g, dtype=f64) * 4]
    xs[0][1], xs[1][1] = xs[0][1] - 60, xs[1][1] - 60                  # episode 1 saturated: p < 1e-20
    xs = [x.requires_grad_(True) for x in xs]
    w = torch.tensor([0.9, 0.1], dtype=f64)
    ours = mixture_log_probabilities(xs, w, (17, 19))
    ups = [F.interpolate(torch.sigmoid(x)[:, None], (17, 19), mode='bilinear', align_corners=True)[:, 0] for x in xs]
    p = 0.9 * ups[0] + 0.1 * ups[1]                                    # the reference
    ref = torch.stack([1 - p, p], 1).clamp(LOG_EPS, 1 - LOG_EPS).log()
    assert torch.allclose(ours.exp().sum(dim=1), torch.ones(2, 17, 19, dtype=f64), atol=1e-12)
    unclamped = (p > 1e-6) & (p < 1 - 1e-6)
    assert unclamped[0].all() and not unclamped[1].all()
    assert torch.allclose(ours.permute(1, 0, 2, 3)[:, unclamped], ref.permute(1, 0, 2, 3)[:, unclamped], atol=1e-9)
    assert torch.allclose(log_upsample(torch.sigmoid(xs[1]).log(), (17, 19)).exp(), ups[1], atol=1e-12)
    # where the reference clamps, its gradient is exactly zero; ours is not, and stays bounded
    mask = ~unclamped[1]
    ref_grad = torch.autograd.grad(ref[1, 1][mask].sum(), xs)
    our_grad = torch.autograd.grad(ours[1, 1][mask].sum(), xs)
    assert all(r.abs().max() == 0 for r in ref_grad) and our_grad[0].abs().max() > 0.1
    assert all(torch.isfinite(o).all() for o in our_grad)


@pytest.mark.slow
def test_qnet_query_loss_is_the_weighted_nll():
    model = make('qnet', 'resnet50')
    ep = episode(b=2, k=1, seed=8)
    with torch.no_grad():
        out = run(model, ep)
        terms = model.loss(out, ep)
    assert set(terms) == {'nll', 'align'}
    target = ep['query_mask']
    keep = target != 255
    p = out.logits[:, 1].exp()
    nll = torch.where(target == 1, -p.log(), -(1 - p).log())
    w = torch.where(target == 1, 1.0, BG_WEIGHT)
    assert torch.allclose(terms['nll'], (w * nll)[keep].sum() / w[keep].sum(), rtol=1e-5)
    assert set(model.loss(type(out)(out.logits), ep)) == {'nll'}       # adapted outputs carry no aux


def reference_align_loss(model, aux, logits, support_masks):
    r"""Q-Net's alignLoss written as the reference (features upsampled to the image, loops over episodes/shots)."""
    b, k, size = support_masks.shape[0], support_masks.shape[1], support_masks.shape[-2:]
    total = 0
    for epi in range(b):
        p = logits[epi, 1].exp()
        pred = torch.stack([1 - p, p]).argmax(dim=0).to(p.dtype)
        if pred.sum() == 0:
            continue
        for shot in range(k):
            preds = []
            for n in range(2):
                up = F.interpolate(aux['query_paths'][n][epi:epi + 1], size, mode='bilinear', align_corners=False)
                proto = (up * pred).sum(dim=(2, 3)) / (pred.sum() + 1e-5)
                sf = aux['support_paths'][n][epi * k + shot:epi * k + shot + 1]
                sim = -F.cosine_similarity(sf, proto[..., None, None], dim=1) * 20
                sp = 1 - torch.sigmoid(0.5 * (sim - aux['threshold'][epi]))
                preds.append(F.interpolate(sp[None], size, mode='bilinear', align_corners=True)[0])
            mix = (0.9 * preds[0] + 0.1 * preds[1]) / 1.0
            log_prob = torch.cat([1 - mix, mix]).clamp(LOG_EPS, 1 - LOG_EPS).log()[None]
            total = total + F.nll_loss(log_prob, support_masks[epi, shot][None].long()) / k
    return total / b


@pytest.mark.slow
def test_alignment_loss_equals_the_reference_loops():
    model = make('qnet', 'resnet50').double()
    g = torch.Generator().manual_seed(9)
    b, k, h = 3, 2, 6
    aux = {'query_paths': [torch.randn(b, 512, h, h, generator=g, dtype=f64) for _ in range(2)],
           'support_paths': [torch.randn(b * k, 512, h, h, generator=g, dtype=f64) for _ in range(2)],
           'threshold': torch.randn(b, generator=g, dtype=f64)}
    p = torch.rand(b, 20, 20, generator=g, dtype=f64)
    p[1] *= 0.4                                                        # no predicted foreground: skipped
    logits = torch.stack([1 - p, p], dim=1).log()
    masks = (torch.rand(b, k, 20, 20, generator=g) > 0.5).to(f64)
    ours = model.alignment_loss(aux, logits, masks)
    assert torch.allclose(ours, reference_align_loss(model, aux, logits, masks), atol=1e-10) and ours > 0


@pytest.mark.slow
def test_episodes_of_a_batch_and_their_shots_are_not_mixed():
    r"""The reference views [way, shot, B] features as [B, way, shot] and subtracts the whole batch's T from each
    episode; here every episode of a batch predicts exactly what it predicts alone."""
    model = make('qnet', 'resnet50')
    ep = episode(b=3, k=2, seed=10)
    with torch.no_grad():
        batched = run(model, ep).logits
        alone = torch.cat([run(model, {k: v[i:i + 1] for k, v in ep.items()}).logits for i in range(3)])
    assert torch.allclose(batched, alone, atol=1e-5)


# --- Q-Net: test-time refinement --------------------------------------------------------------------------------------
def test_refinement_objective_by_hand():
    g = torch.Generator().manual_seed(11)
    feat = torch.randn(1, 6, 4, 5, generator=g, dtype=f64)
    proto = torch.randn(1, 6, generator=g, dtype=f64, requires_grad=True)
    fg = torch.rand(1, 4, 5, generator=g) > 0.5
    loss = refinement_loss(feat, proto, fg)
    new = torch.where(fg[:, None], proto[:, :, None, None], feat)
    a = torch.sigmoid((feat - feat.min()) / (feat.max() - feat.min()))
    bt = torch.sigmoid((new - new.min()) / (new.max() - new.min()))
    hand = -(bt * a.log() + (1 - bt) * (1 - a).log()).mean()          # BCE(input a, target b̃): linear in b̃
    assert torch.allclose(loss, hand, atol=1e-12)
    grad, = torch.autograd.grad(loss, proto)
    hand_grad, = torch.autograd.grad(hand, proto)
    assert torch.allclose(grad, hand_grad, atol=1e-12) and grad.abs().sum() > 0
    empty = torch.zeros_like(fg)                                       # nothing predicted: nothing to refine
    assert torch.autograd.grad(refinement_loss(feat, proto, empty), proto)[0].abs().max() == 0


class Capture(Hooks):
    r"""Adds a fixed vector to every foreground prototype (a stand-in plug-in) and records what it is given."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def prototypes(self, fg, bg, feats, ctx):
        self.calls.append((fg, bg))
        return [f + 0.5 for f in fg], bg


@pytest.mark.slow
def test_refinement_starts_from_the_fused_prototypes_moves_them_and_resets(monkeypatch):
    model = make('qnet', 'resnet50').attach(Capture())
    assert (model.adaptation.steps, model.adaptation.lr) == (30, 2e-3)          # the pinned default
    e1, e2 = episode(b=1, k=2, seed=12), episode(b=1, k=1, seed=13)
    seen, match = [], model.match

    def spy(rec):
        seen.append([p.detach().clone() for p in rec.state.get('prototypes', [])])
        return match(rec)
    monkeypatch.setattr(model, 'match', spy)
    with torch.no_grad():
        rec = record(model, e1)
        fused = model.prototypes(model.paths(rec.support_feats), rec)
        first = model.infer(rec).logits
        model.infer(record(model, e2))
        again = model.infer(record(model, e1)).logits
        model.set_test_time(finetune_steps=0)
        plain = model.infer(record(model, e1)).logits
    bg = model.hooks.calls[0][1]
    assert bg == [None, None]                                          # Q-Net has no background prototype
    refined = seen[0]
    assert len(refined) == 2 and all(r.shape == (1, 512) for r in refined)
    assert all((r - f).abs().max() > 1e-4 for r, f in zip(refined, fused))      # the refinement moves them
    # from the fused prototypes (the hook's +0.5 included): 30 Adam steps at 2e-3 move a coordinate by < 0.25
    assert all((r - f).abs().max() < 0.25 for r, f in zip(refined, fused))
    assert torch.equal(first, again) and all(torch.equal(a, b) for a, b in zip(seen[0], seen[2]))
    assert seen[3] == [] and not torch.allclose(first, plain)


# --- CD-TG plug-in points --------------------------------------------------------------------------------------------
class Shift(Hooks):
    r"""A learnable shift of the background prototypes only (a stand-in for CD-TG's background text)."""

    def __init__(self):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(256))

    def prototypes(self, fg, bg, feats, ctx):
        return fg, [b + self.delta for b in bg]


@pytest.mark.parametrize('name', ['pmms', 'rpmms'])
@pytest.mark.slow
def test_pmms_fused_prototypes_train_the_plugin_through_the_probability_map(name):
    model = make(name).train()
    model.attach(Shift())
    ep = episode(b=2, k=2, seed=14)
    with torch.no_grad():
        model.hooks.delta.normal_(0, 0.1)
    torch.manual_seed(0)
    sum(model.loss(run(model, ep), ep).values()).backward()
    # background prototypes reach the loss only through P: the gradient proves P keeps the path to fused prototypes
    assert model.hooks.delta.grad is not None and model.hooks.delta.grad.abs().sum() > 0


# --- end to end ---------------------------------------------------------------------------------------------------
def tiny_train(method: str, datapath, logpath, *extra: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return train_cli.main(['--method', method, '--benchmark', 'synthetic', '--datapath', str(datapath),
                               '--backbone-weights', 'none', '--bn-calibration', '8', '--img-size', str(SIZE),
                               '--bsz', '2', '--epochs', '1', '--episodes-per-epoch', '4', '--val-episodes', '2',
                               '--workers', '0', '--seed', '0', '--logpath', str(logpath), *extra])


def tiny_test(run_dir, benchmark, datapath, logpath, nshot, *extra: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return test_cli.main(['--load', str(run_dir / 'best.pt'), '--benchmark', benchmark, '--datapath',
                              str(datapath), '--nshot', str(nshot), '--episodes', '2', '--bsz', '2', '--workers', '0',
                              '--device', 'cpu', '--logpath', str(logpath), *extra])


@pytest.fixture(scope='module')
def medical(tmp_path_factory):
    from fixtures_targets import write_chaos, write_wbc
    from data.chaos import prepare
    root = tmp_path_factory.mktemp('medical')
    write_wbc(root)
    write_chaos(root, pids=(1, 2, 3), n_slices=3, size=16)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        prepare(root)
    return root


# a 64-d shared alignment space: a small plug-in, so tiny runs stay fast
CDTG = ['--cdtg', '--clip-weights', 'none', '--cdtg-width', '64']


@pytest.mark.parametrize('method, backbone', [('pmms', 'resnet50'), ('rpmms', 'resnet50'), ('qnet', 'resnet50')])
@pytest.mark.slow
def test_train_and_test_with_and_without_cdtg(method, backbone, datapath, medical, tmp_path):
    r"""Each method trains two steps plain (1-shot; Q-Net two epochs) and with CD-TG (2-shot) on `synthetic`, and
    tests on synthetic-med and the WBC fixture, 1- and 5-shot. (Q-Net here on ResNet-50, its selectable backbone;
    its default ResNet-101 runs the parity tests of tests/test_parity.py.)"""
    plain, guided = tmp_path / 'plain', tmp_path / 'cdtg'
    epochs = 2 if method == 'qnet' else 1
    out = tiny_train(method, datapath, plain, '--backbone', backbone, '--epochs', str(epochs))
    assert out['best']['epoch'] in range(epochs) and len(out['history']) == epochs
    if method == 'qnet':       # the reference's clamped loss and augmentation: every step finite (else the guard stops)
        assert all(math.isfinite(h['train']['loss']) for h in out['history'])
    out = tiny_train(method, datapath, guided, '--backbone', backbone, '--nshot', '2', *CDTG)
    assert out['best']['epoch'] == 0
    results = {}
    for run_dir, shots in ((plain, (1, 5)), (guided, (5, 1))):
        med = tiny_test(run_dir, 'synthetic-med', datapath, run_dir / 'med', shots[0])
        wbc = tiny_test(run_dir, 'wbc', medical, run_dir / 'wbc', shots[1])
        assert med['method'] == wbc['method'] == method and (med['plugin'] is None) == (run_dir is plain)
        assert set(wbc['per_class']) == {'nucleus', 'cytoplasm'} and wbc['nshot'] == shots[1]
        if method == 'qnet':                      # settings recorded only for a method that adapts
            assert med['test_time_adaptation'] == {'steps': 30, 'lr': 2e-3}
        else:
            assert med['test_time_adaptation'] is None
        results[run_dir] = med
    if method == 'pmms':
        # deterministic EM: the same results in another run, with worker processes
        again = tiny_test(plain, 'synthetic-med', datapath, tmp_path / 'workers', 1, '--workers', '2')
        assert (again['per_class'], again['fbiou']) == (results[plain]['per_class'], results[plain]['fbiou'])
    if method == 'qnet':
        # the usual CHAOS host: the volumetric protocol with the refinement (a few of its steps: the default 30 run
        # the same code, in the 2D tests above), and without it
        res = tiny_test(plain, 'chaos', medical, tmp_path / 'chaos', 1, '--protocol', 'volumetric',
                        '--finetune-steps', '3')
        assert res['protocol'] == 'volumetric' and set(res['per_class_dice']) == {'liver', 'right kidney',
                                                                                'left kidney', 'spleen'}
        res0 = tiny_test(plain, 'chaos', medical, tmp_path / 'chaos0', 1, '--protocol', 'volumetric',
                         '--finetune-steps', '0')
        assert res0['test_time_adaptation']['steps'] == 0
        saved = json.loads((tmp_path / 'chaos' / 'results.json').read_text())
        assert len(saved['tasks']) == 4 * 2
