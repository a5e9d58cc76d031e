r"""HSNet and the frozen backbone: taps, parameter count, gradients, K-shot sharing and voting, weight loading."""
import urllib.error

import pytest
import torch
import torch.nn as nn

from common.errors import UserError
from model import Backbone, Output, build_method
from model.base import Vote
from model.backbone import _SPECS


@pytest.fixture(scope='module')
def hsnet():
    torch.manual_seed(0)
    return build_method('hsnet', 'resnet50', 'none')


def _conv_params(cin, cout, k):
    return cin * cout * k * k + cout


def expected_hsnet_params(stage_sizes):
    r"""Hand count of HSNet's learner: CP-4D conv = two 2D convs; GroupNorm = weight + bias."""
    def block(cin, outs, kernels):
        total, c = 0, cin
        for o, k in zip(outs, kernels):
            total += 2 * _conv_params(c, o, k) + 2 * o
            c = o
        return total
    squeeze = (block(stage_sizes[0], [16, 64, 128], [3, 3, 3]) + block(stage_sizes[1], [16, 64, 128], [5, 3, 3])
               + block(stage_sizes[2], [16, 64, 128], [5, 5, 3]))
    mix = 2 * block(128, [128, 128, 128], [3, 3, 3])
    decoder = _conv_params(128, 128, 3) + _conv_params(128, 64, 3) + _conv_params(64, 64, 3) + _conv_params(64, 2, 3)
    return squeeze + mix + decoder


def test_parameter_count_resnet50(hsnet):
    n = sum(p.numel() for p in hsnet.trainable_parameters())
    assert n == expected_hsnet_params([3, 6, 4])
    assert 2.55e6 < n < 2.6e6            # the paper's 2.57 M
    assert all(not p.requires_grad for p in hsnet.backbone.parameters())


def test_resnet_taps_are_bottleneck_outputs_before_relu(hsnet):
    bb = hsnet.backbone
    outputs = []
    hooks = [blk.register_forward_hook(lambda m, i, o: outputs.append(o))
             for layer in (bb.net.layer2, bb.net.layer3, bb.net.layer4) for blk in layer]
    x = torch.randn(2, 3, 64, 64)
    try:
        with torch.no_grad():
            net = bb.net
            net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
    finally:
        for h in hooks:
            h.remove()
    taps = bb(x)
    assert len(taps) == 13 == len(outputs)
    assert [t.shape[1:] for t in taps] == [(512, 8, 8)] * 4 + [(1024, 4, 4)] * 6 + [(2048, 2, 2)] * 3
    assert bb.stage_ids == [2] * 4 + [3] * 6 + [4] * 3 and bb.stage_sizes == [3, 6, 4]
    for tap, out in zip(taps, outputs):
        assert (tap < 0).any()                          # before the ReLU
        # (BatchNorm is folded into the convs in our forward: equal up to float rounding)
        assert torch.allclose(torch.relu(tap), out, rtol=1e-5, atol=1e-5 * float(out.abs().max()))


@pytest.mark.slow
def test_vgg_taps():
    torch.manual_seed(0)
    bb = Backbone('vgg16', 'none')
    x = torch.randn(1, 3, 64, 64)
    taps = bb(x)
    assert [t.shape[1:] for t in taps] == [(512, 8, 8)] * 3 + [(512, 4, 4)] * 3 + [(512, 2, 2)]
    assert bb.stage_sizes == [1, 3, 3]
    with torch.no_grad():
        ref = x
        for idx, module in enumerate(bb.net.features):
            ref = module(ref)
            if idx == 17:
                assert torch.allclose(taps[0], ref)     # conv4_1 before its ReLU
    assert torch.allclose(taps[-1], ref)                # pool5


def test_backbone_stays_frozen_and_in_eval(hsnet):
    hsnet.train()
    assert hsnet.training and not hsnet.backbone.training
    assert all(not m.training for m in hsnet.backbone.modules())
    b, k, s = 2, 1, 64
    output = hsnet(torch.randn(b, 3, s, s), torch.randn(b, k, 3, s, s), (torch.rand(b, k, s, s) > 0.5).float(),
                   torch.zeros(b, dtype=torch.long))
    assert output.logits.shape == (b, k, 2, s, s)
    loss = hsnet.loss(output, {'query_mask': (torch.rand(b, s, s) > 0.5).long()})['ce']
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in hsnet.backbone.parameters())
    grads = [p.grad for p in hsnet.trainable_parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    hsnet.zero_grad(set_to_none=True)
    hsnet.eval()


def test_loss_ignores_255(hsnet):
    logits = torch.randn(1, 1, 2, 4, 4)
    target = torch.randint(0, 2, (1, 4, 4))
    ignored = target.clone()
    ignored[0, 0] = 255
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[0] = False
    expected = nn.functional.cross_entropy(logits[0, 0].permute(1, 2, 0)[keep], target[0][keep])
    assert torch.allclose(hsnet.loss(Output(logits), {'query_mask': ignored})['ce'], expected)


def test_kshot_shares_query_features_and_matches_per_shot_loop(hsnet):
    torch.manual_seed(1)
    b, k, s = 2, 3, 64
    q, sup = torch.randn(b, 3, s, s), torch.randn(b, k, 3, s, s)
    masks = (torch.rand(b, k, s, s) > 0.6).float()
    cid = torch.zeros(b, dtype=torch.long)
    calls = []
    handle = hsnet.backbone.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            joint = hsnet(q, sup, masks, cid).logits
            assert calls == [b * (k + 1)]                # one backbone pass: B queries + B*K supports
            per_shot = torch.cat([hsnet(q, sup[:, i:i + 1], masks[:, i:i + 1], cid).logits for i in range(k)], dim=1)
    finally:
        handle.remove()
    assert torch.allclose(joint, per_shot, atol=1e-5)


def _reference_vote(per_shot_argmax):
    r"""HSNet predict_mask_nshot: sum of argmax masks / max(max vote, 1), thresholded at 0.5."""
    agg = per_shot_argmax.sum(1).double()
    bsz = agg.shape[0]
    max_vote = torch.maximum(agg.view(bsz, -1).max(1).values, torch.ones(bsz, dtype=torch.float64)).view(bsz, 1, 1)
    pred = agg / max_vote
    return (pred >= 0.5).long()


def test_vote_matches_reference():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 2, 6, 6)
    logits[3, :, 0] = 10                               # all shots say background -> max vote 0 -> empty mask
    expected = _reference_vote(logits.argmax(2))
    assert torch.equal(Vote.segment(logits), expected)
    assert Vote.segment(logits)[3].sum() == 0
    assert torch.equal(Vote.segment(logits[:, :1]), logits[:, 0].argmax(1))


@pytest.mark.slow
def test_bn_calibration_normalises_first_layer_and_keeps_weights():
    torch.manual_seed(0)
    bb = Backbone('resnet50', 'none')
    weights = {k: v.clone() for k, v in bb.state_dict().items() if 'running' not in k and 'num_batches' not in k}
    images = torch.randn(12, 3, 32, 32) * 0.5 + 0.3
    assert bb.calibrate_bn([images[:6], images[6:]]) == 12
    assert not any(m.training for m in bb.modules())
    after = bb.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    with torch.no_grad():
        y = bb.net.bn1(bb.net.conv1(images))           # eval mode: uses the calibrated statistics
    assert y.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (y.var(dim=(0, 2, 3), unbiased=True) - 1).abs().max() < 1e-2
    with pytest.raises(UserError):
        Backbone('vgg16', 'none').calibrate_bn([images])


@pytest.mark.slow
def test_folded_batchnorm_tracks_every_change():
    torch.manual_seed(0)
    bb = Backbone('resnet50', 'none')
    x = torch.randn(2, 3, 64, 64)

    def check():
        folded, plain = bb(x), bb._forward_resnet(x, fold=False)
        for a, b in zip(folded, plain):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
        return folded
    before = check()
    bb.calibrate_bn([torch.randn(4, 3, 64, 64)])                   # statistics change in place
    after = check()
    assert not torch.allclose(before[-1], after[-1])
    state = {k: v.clone() for k, v in bb.state_dict().items()}
    state['net.layer2.0.bn1.weight'].mul_(2)
    bb.load_state_dict(state)                                      # weights change through load_state_dict
    assert not torch.allclose(check()[0], after[0])
    bb.double()                                                    # dtype change
    assert bb(x.double())[0].dtype == torch.float64


@pytest.mark.slow
def test_local_weight_file(tmp_path):
    torch.manual_seed(3)
    src = _SPECS['resnet50'][0](weights=None)
    path = tmp_path / 'r50.pth'
    torch.save({'state_dict': {f'module.{k}': v for k, v in src.state_dict().items()}}, path)
    bb = Backbone('resnet50', str(path))
    assert torch.equal(bb.net.conv1.weight, src.conv1.weight)
    torch.save({'conv1.weight': torch.zeros(1)}, tmp_path / 'bad.pth')
    with pytest.raises(UserError, match='do not fit'):
        Backbone('resnet50', str(tmp_path / 'bad.pth'))
    with pytest.raises(UserError, match='no such file'):
        Backbone('resnet50', str(tmp_path / 'missing.pth'))
    (tmp_path / 'junk.pth').write_text('not a checkpoint')
    with pytest.raises(UserError, match='could not read'):
        Backbone('resnet50', str(tmp_path / 'junk.pth'))


def test_imagenet_download_failure_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(_SPECS['resnet50'][1], 'get_state_dict', offline)
    with pytest.raises(UserError) as err:
        Backbone('resnet50', 'imagenet')
    msg = str(err.value)
    assert 'resnet50-0676ba61.pth' in msg and '--backbone-weights' in msg and str(tmp_path) in msg


def test_unknown_names_are_errors():
    with pytest.raises(UserError):
        Backbone('resnet18', 'none')
    with pytest.raises(UserError):
        build_method('nonexistent', 'resnet50', 'none')
