r"""Every host as shipped is its reference: the backbone geometry of PMMs/RPMMs (DeepLab-v2) and Q-Net (dilation
[True, True, False]) against float64 re-derivations, RPMMs' K-shot prediction, Q-Net's clamped log-probabilities,
the methods' training recipes, `--cdtg-features` on every prototype host, and old checkpoints keeping the
behaviour they were trained with."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import models

import train as train_cli
from common.checkpoint import load_checkpoint, save_checkpoint
from common.constants import TRAIN_DEFAULTS
from common.errors import UserError
from engine.factory import build_model, load_model
from model import build_method, stored_options, train_recipe
from model.backbone import Backbone, BackboneSpec
from model.pmms import stage_mean_log_probabilities
from tests.golden.make import CDTG_CLASSES, cdtg_config

f64 = torch.float64
pytestmark = pytest.mark.usefixtures('one_thread')


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return fn(*args, **kw)


def randomise_bn(net: nn.Module, seed: int = 0) -> None:
    r"""BatchNorm statistics and affine parameters away from 0/1, so the folded convolutions are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(1 + 0.2 * torch.rand(m.num_features, generator=g))
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))


# --- geometry -----------------------------------------------------------------------------------------------------
def deeplab_v2_taps(state: dict, x: torch.Tensor, blocks=(3, 4, 6)) -> list[torch.Tensor]:
    r"""layer2 and layer3 of a DeepLab-v2 ResNet (PMMs' `resnet_dialated.py`, written out here with functional
    calls): 7x7 stem, ceil-mode max-pool, bottlenecks with the stride on their first 1x1 conv, layer3 dilated 2 in
    every block; eval-mode BatchNorm from the torchvision-named `state`."""
    def bn(t, key):
        return F.batch_norm(t, state[f'{key}.running_mean'], state[f'{key}.running_var'], state[f'{key}.weight'],
                            state[f'{key}.bias'], False, 0.0, 1e-5)

    def bottleneck(t, key, stride, dilation, down):
        out = torch.relu(bn(F.conv2d(t, state[f'{key}.conv1.weight'], stride=stride), f'{key}.bn1'))
        out = torch.relu(bn(F.conv2d(out, state[f'{key}.conv2.weight'], padding=dilation, dilation=dilation),
                            f'{key}.bn2'))
        out = bn(F.conv2d(out, state[f'{key}.conv3.weight']), f'{key}.bn3')
        identity = bn(F.conv2d(t, state[f'{key}.downsample.0.weight'], stride=stride), f'{key}.downsample.1') \
            if down else t
        return torch.relu(out + identity)

    t = torch.relu(bn(F.conv2d(x, state['conv1.weight'], stride=2, padding=3), 'bn1'))
    t = F.max_pool2d(t, 3, 2, 1, ceil_mode=True)
    taps = []
    for layer, (n, stride, dilation) in enumerate(zip(blocks, (1, 2, 1), (1, 1, 2)), start=1):
        for i in range(n):
            t = bottleneck(t, f'layer{layer}.{i}', stride if i == 0 else 1, dilation, i == 0)
        if layer > 1:
            taps.append(t)
    return taps


@pytest.mark.slow
def test_pmms_backbone_is_the_reference_deeplab_v2_resnet_float64():
    model = quiet(build_method, 'pmms', None, 'none').double()
    randomise_bn(model.backbone.net)
    state = {k: v.double() for k, v in model.backbone.net.state_dict().items()}
    # 72 -> stem 36 -> max-pool ceil 19 (floor 18) -> layer2 10 (torchvision: 9)
    x = torch.randn(2, 3, 72, 72, generator=torch.Generator().manual_seed(1), dtype=f64)
    with torch.no_grad():
        ours = model.backbone(x)
        ref = deeplab_v2_taps(state, x)
        cheap = quiet(build_method, 'pmms', None, 'none', geometry='torchvision').double()
        cheap.backbone.net.load_state_dict(model.backbone.net.state_dict())
        other = cheap.backbone(x)
    assert model.backbone.spec.geometry == 'deeplab-v2' and cheap.backbone.spec.geometry == 'torchvision'
    for o, r in zip(ours, ref):
        assert o.shape == r.shape == (2, o.shape[1], 10, 10)
        assert float((o - r).abs().max() / r.abs().max()) < 1e-12
    assert other[0].shape[-1] == 9                     # the torchvision geometry is another network: the test can fail


@pytest.mark.slow
def test_qnet_backbone_is_torchvision_with_the_reference_dilation_float64():
    model = quiet(build_method, 'qnet', 'resnet50', 'none').double()
    randomise_bn(model.backbone.net, seed=2)
    ref = models.resnet50(weights=None, replace_stride_with_dilation=[True, True, False]).double().eval()
    ref.load_state_dict(model.backbone.net.state_dict())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3), dtype=f64)
    with torch.no_grad():
        ours = model.backbone(x)
        t = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        layer3 = ref.layer3(ref.layer2(ref.layer1(t)))
        layer4 = ref.layer4(layer3)
    assert ours[0].shape[-1] == 16 and ours[1].shape[-1] == 8            # paths at 1/4 and 1/8
    for o, r in zip(ours, (layer3, layer4)):
        assert float((o - r).abs().max() / r.abs().max()) < 1e-12
    cheap = quiet(build_method, 'qnet', 'resnet50', 'none', geometry='stride8')
    assert cheap.backbone.spec.dilate == (False, True, True)


def test_geometry_switches_change_no_weight_names():
    keys = {n: set(Backbone('resnet50', None, BackboneSpec(taps=('layer3',), **kw)).net.state_dict())
            for n, kw in (('tv', {}), ('v2', dict(stride_on_conv1=True, ceil_pool=True, dilate_first=True)))}
    assert keys['tv'] == keys['v2']
    with pytest.raises(UserError, match='vgg16'):
        Backbone('vgg16', None, BackboneSpec(ceil_pool=True))


# --- RPMMs' K-shot prediction and Q-Net's log-probabilities -------------------------------------------------------
def test_rpmms_kshot_prediction_is_the_reference_mean_of_the_stages():
    g = torch.Generator().manual_seed(4)
    stages = [torch.randn(2, 2, 5, 6, generator=g, dtype=f64) * 3 for _ in range(3)]
    ours = stage_mean_log_probabilities(stages, (11, 13))
    out5 = sum(torch.softmax(s, dim=1) for s in stages) / 5                       # FRPMMs.forward_5shot
    ref = torch.softmax(F.interpolate(out5, (11, 13), mode='bilinear', align_corners=False), dim=1)   # get_pred
    assert torch.equal(ours.argmax(dim=1), ref.argmax(dim=1))
    assert torch.allclose(ours.exp(), F.interpolate(out5 * 5 / 3, (11, 13), mode='bilinear'), atol=1e-14)

    model = quiet(build_method, 'rpmms', None, 'none').eval()
    seen = []
    model.segmentation = (lambda f: lambda *a: seen.append(f(*a)) or seen[-1])(model.segmentation)
    b, k, size = 1, 2, 48
    gen = torch.Generator().manual_seed(5)
    masks = torch.zeros(b, k, size, size)
    masks[..., 10:30, 12:34] = 1
    args = (torch.randn(b, 3, size, size, generator=gen), torch.randn(b, k, 3, size, size, generator=gen), masks,
            torch.zeros(b, dtype=torch.long))
    with torch.no_grad():
        out = model(*args).logits
        assert len(seen) == 3
        assert torch.allclose(out, stage_mean_log_probabilities(seen, (size, size)), atol=1e-6)
        model.options.kshot_prediction = 'last'
        seen.clear()
        last = model(*args).logits
    assert torch.allclose(last, F.interpolate(seen[-1], (size, size), mode='bilinear'), atol=1e-6)
    assert not torch.allclose(out.argmax(dim=1), last.argmax(dim=1)) or not torch.allclose(out, last)


def test_qnet_clamped_log_probabilities_are_the_reference_with_its_zero_gradient():
    from model.qnet import clamped_log_probabilities, mixture_log_probabilities
    g = torch.Generator().manual_seed(15)
    xs = [torch.randn(2, 5, 6, generator=g, dtype=f64) * 4, torch.randn(2, 3, 4, generator=g, dtype=f64) * 4]
    xs[0][1], xs[1][1] = xs[0][1] - 60, xs[1][1] - 60                  # episode 1 saturated
    xs = [x.requires_grad_(True) for x in xs]
    w = torch.tensor([0.9, 0.1], dtype=f64)
    ours = clamped_log_probabilities(xs, w, (17, 19))
    ups = [F.interpolate(torch.sigmoid(x)[:, None], (17, 19), mode='bilinear', align_corners=True)[:, 0] for x in xs]
    p = (0.9 * ups[0] + 0.1 * ups[1]) / 1.0                            # the reference's combination
    eps = torch.finfo(torch.float32).eps
    ref = torch.log(torch.clamp(torch.stack([1 - p, p], 1), eps, 1 - eps))
    assert torch.allclose(ours, ref, atol=1e-14, rtol=0)
    grad = torch.autograd.grad(ours[1, 1].sum(), xs)
    assert all(float(t.abs().max()) == 0 for t in grad)                 # saturated: no gradient, as the reference
    exact = mixture_log_probabilities(xs, w, (17, 19))
    assert float(torch.autograd.grad(exact[1, 1].sum(), xs)[0].abs().max()) > 0.1     # the option differs

    model = quiet(build_method, 'qnet', 'resnet50', 'none')
    assert model.options.log_prob == 'clamped'
    assert torch.equal(model.log_probabilities([x.float().detach() for x in xs], (17, 19)),
                       clamped_log_probabilities([x.float().detach() for x in xs], w.float(), (17, 19)))


# --- recipes ------------------------------------------------------------------------------------------------------
def test_train_recipes_are_the_references():
    assert train_recipe('hsnet') == TRAIN_DEFAULTS == train_recipe('patnet', 5)
    assert train_recipe('pmms') == dict(TRAIN_DEFAULTS, img_size=321, bsz=8, augmentation='flip-resized-crop') \
        == train_recipe('rpmms', 5)
    assert train_recipe('dmtnet') == dict(TRAIN_DEFAULTS, epochs=20, bsz=24)
    assert train_recipe('ifa', 1)['bsz'] == 12 and train_recipe('ifa', 5)['bsz'] == 6
    assert train_recipe('ifa', 5)['epochs'] == 20
    assert train_recipe('qnet') == dict(TRAIN_DEFAULTS, train_boundary='ignore', augmentation='gamma-affine-elastic')
    with pytest.raises(UserError, match='unknown method'):
        train_recipe('nope')
    helps = train_cli.build_parser('ifa').format_help()
    assert "the method's, 12 (1-shot), 6 (K > 1) for ifa" in ' '.join(helps.split())


@pytest.mark.slow
def test_a_run_takes_the_methods_recipe_unless_typed_and_old_checkpoints_keep_their_geometry(datapath, tmp_path,
                                                                                              capsys):
    quiet(train_cli.main, ['--method', 'rpmms', '--benchmark', 'synthetic', '--datapath', str(datapath),
                           '--backbone-weights', 'none', '--img-size', '64', '--epochs', '1',
                           '--episodes-per-epoch', '8', '--val-episodes', '2', '--workers', '0', '--tb-images', '0',
                           '--logpath', str(tmp_path)])
    config = load_checkpoint(tmp_path / 'best.pt')['config']
    assert (config['img_size'], config['bsz'], config['epochs']) == (64, 8, 1)          # typed, method's, typed
    assert config['recipe_from_method'] == ['augmentation', 'bsz', 'train_boundary']
    assert config['method_options']['geometry'] == 'reference'
    log = (tmp_path / 'log.txt').read_text()
    assert ('recipe: 64px, batch 8*, 1 epochs, label 255 as background*, augmentation flip-resized-crop*, SGD lr '
            '0.00035') in log
    assert 'geometry deeplab-v2 (dilated: layer3)' in log

    model, _ = quiet(load_model, tmp_path / 'best.pt', torch.device('cpu'))
    assert model.backbone.spec.geometry == 'deeplab-v2' and model.options.kshot_prediction == 'stages'
    ckpt = load_checkpoint(tmp_path / 'best.pt')
    for key in ('geometry', 'bn', 'kshot_prediction'):                 # as written before the options existed
        del ckpt['config']['method_options'][key]
    save_checkpoint(ckpt, tmp_path / 'old.pt')
    model, ckpt = quiet(load_model, tmp_path / 'old.pt', torch.device('cpu'))
    assert model.backbone.spec.geometry == 'torchvision' and model.options.kshot_prediction == 'last'
    assert model.backbone.spec.bn == 'frozen'
    assert ckpt['config']['method_options']['geometry'] == 'torchvision'
    assert stored_options('qnet', {}) == {'geometry': 'stride8', 'bn': 'frozen', 'log_prob': 'exact'}


# --- --cdtg-features on every prototype host ----------------------------------------------------------------------
@pytest.mark.parametrize('method', ['pmms', 'rpmms', 'qnet'])
@pytest.mark.slow
def test_cdtg_features_train_and_test_on_every_prototype_host(method):
    config = dict(cdtg_config(method, None), cdtg_features=True, cdtg_width=32, cdtg_text_bias='bounded')
    model = quiet(build_model, config, 'none')
    model.hooks.bind('synthetic-med', CDTG_CLASSES)
    assert model.hooks.tap_level == [0, 1]                 # sized from the two backbone taps the hooks align
    gen = torch.Generator().manual_seed(6)
    size = 48
    for k, training in ((1, True), (5, False), (1, False)):
        model.train(training)
        masks = torch.zeros(1, k, size, size)
        masks[..., 8:30, 10:36] = 1
        with torch.set_grad_enabled(training), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            args = (torch.randn(1, 3, size, size, generator=gen), torch.randn(1, k, 3, size, size, generator=gen),
                    masks, torch.tensor([1]))
            output = model(*args) if training else model.infer(model.encode(*args))
        assert output.logits.shape == (1, 2, size, size) and torch.isfinite(output.logits).all()
        if training:
            batch = {'query_mask': (torch.rand(1, size, size, generator=gen) > 0.5).long(), 'support_masks': masks}
            sum(model.loss(output, batch).values()).backward()
            grads = [p.grad for p in model.hooks.parameters() if p.requires_grad]
            assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_legacy_options_are_options_of_their_method():
    import dataclasses

    from model import METHODS, method_class
    for name in METHODS:
        cls = method_class(name)
        assert set(cls.legacy_options) <= {f.name for f in dataclasses.fields(cls.Options)}, name


# --- training augmentation ----------------------------------------------------------------------------------------
def test_flip_resized_crop_keeps_image_and_mask_aligned_and_is_seeded():
    import numpy as np
    from PIL import Image

    from data.augment import FlipResizedCrop
    aug = FlipResizedCrop()
    arr = np.zeros((60, 90, 3), dtype=np.uint8)
    arr[10:50, 5:40] = 255                                               # a white box, the mask's object
    mask = (arr[..., 0] > 0).astype(np.uint8)
    image = Image.fromarray(arr)
    outs = []
    for seed in range(40):
        img, m = aug(image, mask, np.random.default_rng(seed), 32)
        again, m2 = aug(image, mask, np.random.default_rng(seed), 32)
        assert np.array_equal(np.asarray(img), np.asarray(again)) and np.array_equal(m, m2)     # seeded
        assert img.size == (32, 32) and m.shape == (32, 32) and set(np.unique(m)) <= {0, 1}
        white = np.asarray(img)[..., 0] > 127
        assert (white == (m == 1)).mean() > 0.95                         # the mask moves with its image
        outs.append(m)
    assert len({o.tobytes() for o in outs}) > 30                         # random crops and flips
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = aug.crop(90, 60, rng)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90
        assert h * w >= 0.45 * 90 * 60 or h == w == 60                   # 50-100 % of the area, else the centre square


def test_gamma_affine_elastic_pieces_against_scipy_and_by_hand():
    r"""Q-Net's transform: the Gaussian blur and both bilinear samplers against scipy.ndimage (an independent
    implementation), the affine matrix against the composition of its four maps applied to points one by one, and
    the gamma transform by hand."""
    import math

    import numpy as np
    ndimage = pytest.importorskip('scipy.ndimage')

    from data.augment import GammaAffineElastic, bilinear_sample, gamma_transform, gaussian_blur, warp_affine
    rng = np.random.default_rng(0)
    field = rng.random((23, 31))
    offsets = np.arange(21) - 10.0
    kernel = np.exp(-offsets ** 2 / 50)
    kernel /= kernel.sum()
    expected = ndimage.correlate1d(ndimage.correlate1d(field, kernel, axis=0, mode='mirror'), kernel, axis=1,
                                   mode='mirror')                                     # scipy 'mirror' = reflect-101
    assert np.abs(gaussian_blur(field, 21, 5.0) - expected).max() < 1e-14
    layers = rng.random((17, 19, 2))
    rows, cols = rng.uniform(-4, 21, (9, 11)), rng.uniform(-4, 23, (9, 11))
    for border, mode in (('reflect', 'reflect'), ('zero', 'grid-constant')):
        expected = np.stack([ndimage.map_coordinates(layers[..., c], [rows, cols], order=1, mode=mode, cval=0.0)
                             for c in range(2)], axis=-1)
        assert np.abs(bilinear_sample(layers, rows, cols, border) - expected).max() < 1e-13, border
    # an integer shift moves the image exactly, zeros come in
    shift = np.array([[1, 0, 3], [0, 1, -2], [0, 0, 1]], dtype=np.float32)
    moved = warp_affine(layers, shift)
    assert np.array_equal(moved[:15, 3:], layers[2:, :-3]) and not moved[:, :3].any()
    assert not moved[15:].any()

    class Draws:                           # the generator's uniforms, in the order the reference draws them
        def __init__(self, values):
            self.values = list(values)

        def uniform(self, low, high):
            return self.values.pop(0)

    angle, tx, ty, shear, zoom = 4.0, -3.0, 2.5, -4.5, 1.1
    matrix = GammaAffineElastic().affine_matrix(40, Draws([angle, tx, ty, shear, zoom]))
    c = np.array([20.0, 20.0])
    t, s = math.radians(angle), math.radians(shear)

    def by_hand(p):                        # rotate about c (counter-clockwise, y down), shift, shear, zoom about c
        p = c + np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]]) @ (p - c)
        p = p + np.array([tx, ty])
        p = np.array([[1, -math.sin(s)], [0, math.cos(s)]]) @ p
        return c + zoom * (p - c)
    for point in ([0.0, 0.0], [39.0, 5.0], [12.5, 30.0]):
        assert np.allclose(matrix[:2] @ np.array(point + [1.0]), by_hand(np.array(point)), atol=1e-4)
    pixels = rng.uniform(10, 200, (4, 5, 3))
    low, spread = pixels.min(), pixels.max() - pixels.min() + 1e-5
    assert np.allclose(gamma_transform(pixels, 0.7), spread * ((pixels - low + 1e-5) / spread) ** 0.7 + low, rtol=0,
                       atol=1e-12)
    bent = gamma_transform(pixels, 1.3)                                  # the range maps onto itself (+ 1e-5)
    assert np.isclose(bent.min(), low) and np.isclose(bent.max(), pixels.max() + 1e-5)


def test_gamma_affine_elastic_moves_mask_with_image_and_follows_its_plan():
    import numpy as np
    from PIL import Image

    from data.augment import GammaAffineElastic
    aug = GammaAffineElastic()
    arr = np.zeros((50, 70, 3), dtype=np.uint8)
    arr[10:40, 20:55] = 220
    arr[..., 2] = 40
    mask = (arr[..., 0] > 0).astype(np.uint8)
    mask[9:11, 20:55] = 255                                              # a boundary band of 'ignore'
    image = Image.fromarray(arr)
    seen = set()
    for seed in range(12):
        img, m = aug(image, mask, np.random.default_rng(seed), 64, (True, True))
        again, m2 = aug(image, mask, np.random.default_rng(seed), 64, (True, True))
        assert np.array_equal(np.asarray(img), np.asarray(again)) and np.array_equal(m, m2)        # seeded
        assert img.size == (64, 64) and m.shape == (64, 64) and set(np.unique(m)) <= {0, 1, 255}
        assert (m == 255).any()                                          # the ignore band survives, not blended
        bright = np.asarray(img)[..., 0] > 110
        assert (bright == (m == 1))[m != 255].mean() > 0.97              # the mask moves with its image
        seen.add(m.tobytes())
    assert len(seen) == 12
    plain = np.asarray(image.resize((64, 64), Image.BILINEAR))
    only_gamma, m = aug(image, mask, np.random.default_rng(0), 64, (True, False))
    assert np.array_equal(m, np.asarray(Image.fromarray(mask).resize((64, 64), Image.NEAREST)))   # no geometry
    assert not np.array_equal(np.asarray(only_gamma), plain)
    nothing, _ = aug(image, mask, np.random.default_rng(0), 64, (False, False))
    assert np.array_equal(np.asarray(nothing), plain)
    plans = {tuple(aug.plan(np.random.default_rng(seed), 4)) for seed in range(40)}
    for plan in plans:                    # each transform goes to the query alone or to every support
        for which in (0, 1):
            assert [p[which] for p in plan] in ([True, False, False, False], [False, True, True, True])
    assert len(plans) == 4


def test_training_episodes_are_augmented_evaluation_episodes_never(datapath):
    from data import TrainingEpisodes, build_dataset
    from data.augment import AUGMENTATIONS
    train = quiet(build_dataset, 'synthetic', str(datapath), 'trn', 1, 48)
    episodes = list(TrainingEpisodes(train, 4, seed=3))
    assert all(e.seed is not None for e in episodes)
    assert [e.seed for e in TrainingEpisodes(train, 4, seed=3)] == [e.seed for e in episodes]      # reproducible
    plain = train.load_episode(episodes[0])
    train.augmentation = AUGMENTATIONS['flip-resized-crop']
    first, second = train.load_episode(episodes[0]), train.load_episode(episodes[0])
    assert torch.equal(first['query_img'], second['query_img'])
    assert not torch.equal(first['query_img'], plain['query_img'])
    train.augmentation = AUGMENTATIONS['gamma-affine-elastic']          # an episode-level plan: still seeded
    first, second = train.load_episode(episodes[1]), train.load_episode(episodes[1])
    assert all(torch.equal(first[k], second[k]) for k in ('query_img', 'query_mask', 'support_imgs', 'support_masks'))
    train.augmentation = AUGMENTATIONS['flip-resized-crop']
    fixed = train.sample_episodes(2, seed=0)[0]                          # an evaluation episode: no seed
    augmented = train.load_episode(fixed)['query_img']
    train.augmentation = None
    assert fixed.seed is None and torch.equal(augmented, train.load_episode(fixed)['query_img'])


# --- BatchNorm modes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('mode', ['frozen', 'batch', 'trained'])
def test_backbone_batchnorm_modes(mode):
    from engine.factory import frozen_backbone_keys
    spec = BackboneSpec(taps=('layer2',), trainable=('layer2',), bn=mode)
    backbone = quiet(Backbone, 'resnet50', 'none', spec)
    bn_in, bn_out = backbone.net.layer2[0].bn1, backbone.net.layer1[0].bn1       # a trainable part, a frozen one
    before = bn_in.running_mean.clone(), bn_out.running_mean.clone()
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    backbone.train()
    train_out = backbone(x)[0]
    backbone.eval()
    eval_out = backbone(x)[0]
    moved = not torch.equal(bn_in.running_mean, before[0])
    assert moved == (mode != 'frozen') and torch.equal(bn_out.running_mean, before[1])
    assert torch.allclose(train_out, eval_out) == (mode == 'frozen')      # batch statistics in training only
    assert bn_in.weight.requires_grad == (mode == 'trained') and not bn_out.weight.requires_grad
    assert bool(backbone.moving_buffers()) == (mode != 'frozen')

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone
    frozen = frozen_backbone_keys(Holder())
    assert ('backbone.net.layer2.0.bn1.running_mean' in frozen) == (mode == 'frozen')
    assert 'backbone.net.layer1.0.bn1.running_mean' in frozen


@pytest.mark.slow
def test_reference_batchnorm_defaults_of_pmms_and_qnet():
    pmms = quiet(build_method, 'pmms', None, 'none')
    qnet = quiet(build_method, 'qnet', 'resnet50', 'none')
    assert pmms.backbone.spec.bn == 'batch' and qnet.backbone.spec.bn == 'trained'
    assert not pmms.backbone.net.layer2[0].bn1.weight.requires_grad
    assert qnet.backbone.net.layer2[0].bn1.weight.requires_grad
    assert quiet(build_method, 'qnet', 'resnet50', 'none', bn='frozen').backbone.spec.bn == 'frozen'


@pytest.mark.slow
def test_pmms_training_normalises_supports_and_queries_in_separate_passes():
    r"""PMMs in training (`--bn batch`): the features and the running statistics are those of two backbone passes,
    the supports' and then the queries' (FPMMs.forward), not of one pass over both; at test time one pass (running
    statistics). Q-Net (one pass over [supports, query], as its reference) keeps the joint pass."""
    import copy
    torch.manual_seed(0)
    model = quiet(build_method, 'pmms', None, 'none').double()
    gen = torch.Generator().manual_seed(1)
    q, s = torch.randn(2, 3, 41, 41, generator=gen).double(), torch.randn(2, 1, 3, 41, 41, generator=gen).double()
    m = (torch.rand(2, 1, 41, 41, generator=gen) > 0.5).double()
    by_hand = copy.deepcopy(model.backbone).train()
    expected_s, expected_q = by_hand(s.flatten(0, 1)), by_hand(q)                     # supports first, then queries
    joint = copy.deepcopy(model.backbone).train()(torch.cat([q, s.flatten(0, 1)]))
    model.train()
    record = model.encode(q, s, m, torch.tensor([0, 1]))
    for ours, exp, both in zip(record.query_feats, expected_q, joint):
        assert torch.allclose(ours, exp, rtol=0, atol=1e-12) and not torch.allclose(ours, both[:2], atol=1e-3)
    for ours, exp in zip(record.support_feats, expected_s):
        assert torch.allclose(ours, exp, rtol=0, atol=1e-12)
    bn, ref_bn = model.backbone.net.layer2[0].bn1, by_hand.net.layer2[0].bn1
    assert torch.allclose(bn.running_mean, ref_bn.running_mean, rtol=0, atol=1e-14)
    assert torch.allclose(bn.running_var, ref_bn.running_var, rtol=0, atol=1e-14)
    qnet = quiet(build_method, 'qnet', 'resnet50', 'none')
    assert not qnet.separate_bn_batches and model.separate_bn_batches


# --- IFA's deep-stem ResNet ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_deep_stem_backbone_loads_a_pspnet_style_file_and_refuses_a_download(tmp_path):
    torch.manual_seed(0)
    net = quiet(Backbone, 'resnet50-deep', 'none', BackboneSpec(taps=('layer3',)))
    assert net.net.conv1[0].stride == (2, 2) and net.net.bn1.num_features == 128
    assert net.net.layer1[0].conv1.in_channels == 128 and net.net.layer1[0].downsample[0].in_channels == 128
    full = quiet(Backbone, 'resnet50-deep', 'none', BackboneSpec(taps='bottlenecks'))
    state = {k: v for k, v in full.net.state_dict().items()}
    state['fc.weight'] = torch.zeros(1000, 2048)                        # a classifier in the file is ignored
    torch.save({'state_dict': {f'module.{k}': v for k, v in state.items()}}, tmp_path / 'resnet50.pth')
    loaded = Backbone('resnet50-deep', str(tmp_path / 'resnet50.pth'), BackboneSpec(taps=('layer3',)))
    assert all(torch.equal(v, full.net.state_dict()[k]) for k, v in loaded.net.state_dict().items())
    randomise_bn(loaded.net)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():                                                # folded BN = the modules, stem included
        folded = loaded(x)[0]
        t = loaded.net.maxpool(torch.relu(loaded.net.bn1(loaded.net.conv1(x))))
        unfolded = loaded.net.layer3(loaded.net.layer2(loaded.net.layer1(t)))
    assert float((folded - unfolded).abs().max() / unfolded.abs().max()) < 1e-5
    with pytest.raises(UserError, match='no download.*resnet50.pth.*or choose --backbone resnet50$'):
        Backbone('resnet50-deep', 'imagenet', BackboneSpec(taps=('layer3',)))
    with pytest.raises(UserError, match='do not fit'):                   # a torchvision file is not a deep-stem one
        torch.save(quiet(Backbone, 'resnet50', 'none').net.state_dict(), tmp_path / 'tv.pth')
        Backbone('resnet50-deep', str(tmp_path / 'tv.pth'), BackboneSpec(taps=('layer3',)))


@pytest.mark.slow
def test_deeplabv3_coco_initialisation_loads_the_trunk_or_says_what_to_download(monkeypatch, tmp_path):
    from torchvision.models import segmentation
    enum = segmentation.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1
    trunk = quiet(Backbone, 'resnet50', 'none', BackboneSpec(taps=('layer3', 'layer4'), keep_fc=True)).net
    fake = {f'backbone.{k}': v + 1 for k, v in trunk.state_dict().items() if not k.startswith('fc.')}
    fake['classifier.4.weight'] = torch.zeros(21, 256, 1, 1)            # the segmentation head is not loaded
    monkeypatch.setattr(type(enum), 'get_state_dict', lambda self, progress=True: fake)
    net = Backbone('resnet50', 'deeplabv3-coco', BackboneSpec(taps=('layer3', 'layer4'), keep_fc=True)).net
    assert torch.equal(net.layer2[0].conv1.weight, fake['backbone.layer2.0.conv1.weight'])
    assert torch.equal(net.bn1.running_var, fake['backbone.bn1.running_var'])

    def offline(self, progress=True):
        raise OSError('no network')
    monkeypatch.setattr(type(enum), 'get_state_dict', offline)
    with pytest.raises(UserError, match=r'(?s)deeplabv3-coco weights of resnet50.*deeplabv3_resnet50_coco'):
        Backbone('resnet50', 'deeplabv3-coco', BackboneSpec(taps=('layer3',)))
    with pytest.raises(UserError, match='deeplabv3-coco exists for resnet50, resnet101, not vgg16'):
        Backbone('vgg16', 'deeplabv3-coco')
