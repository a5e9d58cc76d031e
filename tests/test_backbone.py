r"""Backbone specs: layer taps, dilation (output stride), fine-tuned layers with frozen BatchNorm, layers not run."""
import warnings

import pytest
import torch
import torch.nn as nn

from common.errors import UserError
from model.backbone import Backbone, BackboneSpec


def build(name='resnet50', **spec):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return Backbone(name, 'none', BackboneSpec(**spec))


def reference_layers(net, x, upto):
    r"""torchvision's own forward of the stem and layers, float64."""
    out = {}
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    for i in range(1, upto + 1):
        x = getattr(net, f'layer{i}')(x)
        out[f'layer{i}'] = x
    return out


def test_layer_taps_with_dilation_equal_torchvision_forward():
    bb = build(taps=('layer3', 'layer2'), dilate=(False, True, True)).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    taps = bb(x)
    ref = reference_layers(bb.net, x, 3)
    assert [t.shape for t in taps] == [(2, 1024, 8, 8), (2, 512, 8, 8)]       # output stride 8, order as asked
    assert torch.allclose(taps[0], ref['layer3'], atol=1e-10) and torch.allclose(taps[1], ref['layer2'], atol=1e-10)
    assert bb.stage_ids == [3, 2] and bb.channels == [1024, 512]
    assert not hasattr(bb.net, 'layer4') and not hasattr(bb.net, 'fc')        # never run, never stored


def test_tap_without_the_last_relu():
    bb = build(taps=('layer3',), tap_relu=False).double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    tap = bb(x)[0]
    assert (tap < 0).any()
    assert torch.allclose(torch.relu(tap), reference_layers(bb.net, x, 3)['layer3'], atol=1e-10)


def test_trainable_layers_get_gradients_and_batchnorm_stays_frozen():
    bb = build(taps=('layer2', 'layer3'), trainable=('layer3',))
    stats = {k: v.clone() for k, v in bb.state_dict().items() if 'running' in k}
    bb.train()
    x = torch.randn(2, 3, 64, 64)
    l2, l3 = bb(x)
    assert not l2.requires_grad and l3.requires_grad          # frozen prefix runs without gradient
    l3.sum().backward()
    for name, p in bb.named_parameters():
        in_l3 = name.startswith('net.layer3.')
        is_bn = '.bn' in name or 'downsample.1' in name
        assert p.requires_grad == (in_l3 and not is_bn), name
        assert (p.grad is not None) == (in_l3 and not is_bn), name
    assert all(not m.training for m in bb.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(torch.equal(v, bb.state_dict()[k]) for k, v in stats.items())
    with torch.no_grad():
        assert not bb(x)[1].requires_grad                       # no gradient when the caller asks for none


def test_gradient_flows_through_frozen_layers_after_a_trainable_one():
    bb = build(taps=('layer3',), trainable=('layer2',))
    out = bb(torch.randn(1, 3, 64, 64))[0]
    out.sum().backward()
    assert out.requires_grad and bb.net.layer2[0].conv1.weight.grad.abs().sum() > 0
    assert bb.net.layer3[0].conv1.weight.grad is None


def test_resnet101_keeps_fc_for_qnet():
    bb = build('resnet101', taps=('layer3', 'layer4'), dilate=(False, True, True), keep_fc=True,
               trainable=('stem', 'layer1', 'layer2', 'layer3', 'layer4', 'fc'))
    taps = bb(torch.randn(1, 3, 64, 64))
    assert [t.shape for t in taps] == [(1, 1024, 8, 8), (1, 2048, 8, 8)]
    assert bb.net.fc.weight.requires_grad and bb.net.conv1.weight.requires_grad


def test_bad_specs_are_clear_errors():
    with pytest.raises(UserError, match='layer names'):
        build(taps=('layer5',))
    with pytest.raises(UserError, match='trainable'):
        build(trainable=('head',))
    with pytest.raises(UserError, match='vgg16 supports only'):
        build('vgg16', taps=('layer3',))


@pytest.mark.slow
def test_torchvision_segmentation_checkpoints_load_their_backbone(tmp_path):
    r"""A DeepLabv3 / FCN state dict (`backbone.*`, `classifier.*`, `aux_classifier.*`; Q-Net's initialisation)."""
    src = build(taps=('layer3', 'layer4'), dilate=(False, True, True)).net
    state = {f'backbone.{k}': v for k, v in src.state_dict().items() if not k.startswith('fc.')}
    state.update({'classifier.4.weight': torch.zeros(21, 256, 1, 1), 'aux_classifier.4.bias': torch.zeros(21)})
    torch.save(state, tmp_path / 'deeplabv3.pth')
    bb = Backbone('resnet50', str(tmp_path / 'deeplabv3.pth'),
                  BackboneSpec(taps=('layer3', 'layer4'), dilate=(False, True, True), keep_fc=True))
    assert torch.equal(bb.net.conv1.weight, src.conv1.weight)
    assert torch.equal(bb.net.layer4[2].conv3.weight, src.layer4[2].conv3.weight)
    state['backbone.extra.weight'] = torch.zeros(1)
    torch.save(state, tmp_path / 'bad.pth')
    with pytest.raises(UserError, match='unexpected'):
        Backbone('resnet50', str(tmp_path / 'bad.pth'))


def test_backbone_names_of_the_registry_match_the_builders():
    import model
    from model.backbone import BACKBONES
    assert model.BACKBONES == BACKBONES


def test_cpu_1x1_convolutions_stay_on_onednn_with_the_same_taps():
    r"""Single-threaded with a batch below 16, PyTorch would run the ResNet's 33 float32 1x1 convolutions with its slow
    reference kernel; the backbone keeps them on oneDNN (a 1x1 kernel marked dilated) and its taps equal the plain
    F.conv2d forward's to float32 precision (and torchvision's, float64, in the test above)."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    import model.backbone as backbone
    bb = build().eval()
    x = torch.randn(2, 3, 64, 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            ours = bb(x)
        ops = {e.key: e.count for e in prof.key_averages()}
        plain = backbone.conv2d
        backbone.conv2d = F.conv2d
        try:
            with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
                reference = bb(x)
        finally:
            backbone.conv2d = plain
    finally:
        torch.set_num_threads(threads)
    assert 'aten::_slow_conv2d_forward' not in ops and ops['aten::mkldnn_convolution'] == 53
    assert {e.key: e.count for e in prof.key_averages()}['aten::_slow_conv2d_forward'] == 33   # what it avoids
    for a, b in zip(ours, reference):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max())
