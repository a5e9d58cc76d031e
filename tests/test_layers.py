r"""Shared layers against float64 explicit formulas: center-pivot 4D conv, correlation, masked pooling."""
import pytest
import torch
import torch.nn.functional as F

from model.layers import (CenterPivotConv4d, HPNLearner, mask_features, masked_average_pooling,
                          multilayer_correlation, resize_mask)


def naive_cp_conv4d(layer: CenterPivotConv4d, x: torch.Tensor) -> torch.Tensor:
    r"""A full 4D convolution with the center-pivot kernel W_a ⊗ δ_b + δ_a ⊗ W_b, padding k//2, stride (1,1,s,s)."""
    w_a, w_b = layer.conv_query.weight.double(), layer.conv_support.weight.double()
    oc, ic, k, _ = w_a.shape
    c = k // 2
    kernel = torch.zeros(oc, ic, k, k, k, k, dtype=torch.float64)
    kernel[:, :, :, :, c, c] += w_a
    kernel[:, :, c, c, :, :] += w_b
    bias = layer.conv_query.bias.double() + layer.conv_support.bias.double()
    s = layer.stride
    bsz, _, ha, wa, hb, wb = x.shape
    xp = F.pad(x.double(), (c, c, c, c, c, c, c, c))
    ohb, owb = (hb - 1) // s + 1, (wb - 1) // s + 1
    out = bias.view(1, oc, 1, 1, 1, 1).expand(bsz, oc, ha, wa, ohb, owb).clone()
    for a1 in range(k):
        for a2 in range(k):
            for b1 in range(k):
                for b2 in range(k):
                    w = kernel[:, :, a1, a2, b1, b2]
                    if not w.any():
                        continue
                    patch = xp[:, :, a1:a1 + ha, a2:a2 + wa, b1:b1 + s * (ohb - 1) + 1:s, b2:b2 + s * (owb - 1) + 1:s]
                    out += torch.einsum('oi,nixyzw->noxyzw', w, patch)
    return out


@pytest.mark.parametrize('kernel,stride', [(3, 1), (3, 2), (5, 4)])
def test_center_pivot_conv4d_equals_naive_4d_conv_on_several_sizes_in_a_row(kernel, stride):
    torch.manual_seed(0)
    layer = CenterPivotConv4d(2, 3, kernel, stride).double()
    # the same instance on changing sizes: the reference cached its pruning index from the first call
    # support maps with fewer pixels than the kernel take the dense-matrix path of the support conv
    for shape in [(4, 4, 4, 4), (3, 5, 7, 6), (3, 4, 2, 2), (6, 4, 13, 13), (2, 3, 1, 3), (2, 3, 8, 8), (5, 5, 25, 25),
                  (4, 3, 2, 3)]:
        x = torch.randn(2, 2, *shape, dtype=torch.float64)
        expected = naive_cp_conv4d(layer, x)
        out = layer(x)
        assert out.shape == expected.shape
        assert torch.allclose(out, expected, atol=1e-10), shape


@pytest.mark.parametrize('support, layout', [((2, 2), 'contiguous'), ((7, 7), 'contiguous'),
                                             ((7, 7), 'correlation')])
def test_center_pivot_conv4d_gradients_match_the_naive_4d_conv(support, layout):
    r"""Also for x stored as the CPU correlation writes it (B,ha,wa,C,hb,wb: an NCHW support-conv input, converted
    to NHWC when the weights get a gradient)."""
    torch.manual_seed(1)
    layer = CenterPivotConv4d(3, 4, 3, 1).double()
    x = torch.randn(2, 3, 4, 5, *support, dtype=torch.float64)
    if layout == 'correlation':
        x = x.permute(0, 2, 3, 1, 4, 5).contiguous().permute(0, 3, 1, 2, 4, 5)
        assert x.permute(0, 2, 3, 1, 4, 5).is_contiguous()
    x.requires_grad_(True)
    upstream = torch.randn(2, 4, 4, 5, *support, dtype=torch.float64)
    params = [x, layer.conv_query.weight, layer.conv_support.weight, layer.conv_support.bias]
    fast = torch.autograd.grad((layer(x) * upstream).sum(), params)
    slow = torch.autograd.grad((naive_cp_conv4d(layer, x) * upstream).sum(), params)
    for a, b in zip(fast, slow):
        assert torch.allclose(a, b, atol=1e-10)


def test_conv4d_rejects_even_kernels():
    with pytest.raises(ValueError):
        CenterPivotConv4d(1, 1, 4)


def _reference_correlation(q, s, eps=1e-5):
    r"""Float64 cosine similarity per (query pixel, support pixel) with HSNet's epsilon placement, clamped at 0."""
    q, s = q.double(), s.double()
    out = torch.zeros(q.shape[-2], q.shape[-1], s.shape[-2], s.shape[-1], dtype=torch.float64)
    qn = q.norm(dim=0) + eps
    sn = s.norm(dim=0) + eps
    for i in range(q.shape[-2]):
        for j in range(q.shape[-1]):
            dots = (q[:, i, j, None, None] * s).sum(0)
            out[i, j] = (dots / (qn[i, j] * sn)).clamp(min=0)
    return out


@pytest.mark.parametrize('channels,path', [((6, 5, 3), 'cpu'), ((6, 5, 3), 'autograd'), ((6, 5, 3), 'masked'),
                                           ((6, 5, 3), 'dense'), ((2, 2, 1), 'cpu')])
# wide maps (4 paths: dense = every support pixel in one product, as the reference code), the small-channel path
def test_multilayer_correlation_matches_float64_formula_with_shared_query(channels, path):
    torch.manual_seed(0)
    stage_ids = [2, 2, 3, 4]
    shapes = {2: (channels[0], 7, 7), 3: (channels[1], 4, 4), 4: (channels[2], 2, 3)}
    b, k = 2, 3
    q = [torch.randn(b, *shapes[s]) for s in stage_ids]
    s = [torch.randn(b * k, *shapes[st]) for st in stage_ids]
    s[0][1, :, :2] = 0                                  # masked-out support pixels -> zero correlation
    if path in ('masked', 'dense'):                     # most support pixels zero in every item: skipped columns
        for tap in range(len(s)):
            s[tap] = s[tap] * (torch.rand(s[tap].shape[-2:]) < 0.3).float()
        s[1][4, :, 0, 0] = 0.5                          # a pixel non-zero in one support only is kept
    if path == 'autograd':
        q = [f.requires_grad_() for f in q]
    corrs = multilayer_correlation(q, s, stage_ids, dense=path == 'dense')
    if path in ('cpu', 'masked') and max(channels) > 4:
        # written in the order the 4D conv reads: NCHW without autograd, NHWC where its weights get a gradient
        with torch.no_grad():
            nchw = multilayer_correlation(q, s, stage_ids)
        assert all(c.permute(0, 2, 3, 1, 4, 5).is_contiguous() for c in nchw)
        assert all(c.permute(0, 2, 3, 4, 5, 1).is_contiguous() for c in corrs)
        assert all(torch.equal(a, c) for a, c in zip(nchw, corrs))
    if path == 'dense':                                 # the one product per stage, in the reference's layout
        assert all(c.is_contiguous() for c in corrs)
    assert [c.shape[1] for c in corrs] == [1, 1, 2]     # deepest stage first
    by_stage = {4: corrs[0], 3: corrs[1], 2: corrs[2]}
    for tap, stage in enumerate(stage_ids):
        layer = [i for i, st in enumerate(stage_ids) if st == stage].index(tap)
        for n in range(b):
            for shot in range(k):
                ref = _reference_correlation(q[tap][n], s[tap][n * k + shot])
                got = by_stage[stage][n * k + shot, layer].double()
                assert torch.allclose(got, ref, atol=1e-6), (tap, n, shot)
    assert (by_stage[2][1, 0, :, :, :2] == 0).all()
    if max(channels) <= 4:     # the small-channel path writes the order the 4D conv reads without a copy
        assert all(c.permute(0, 2, 3, 4, 5, 1).is_contiguous() for c in corrs)


@pytest.mark.parametrize('grad', [False, True])
def test_correlation_masks_supports_exactly_as_mask_features(grad):
    torch.manual_seed(0)
    stage_ids = [2, 2, 3]
    q = [torch.randn(1, 6, 8, 8), torch.randn(1, 6, 8, 8), torch.randn(1, 5, 4, 4)]
    s = [torch.randn(2, *f.shape[1:]).requires_grad_(grad) for f in q]
    masks = (torch.rand(2, 32, 32) > 0.6).float()
    before = [t.detach().clone() for t in s]
    got = multilayer_correlation(q, s, stage_ids, support_masks=masks)
    assert all(torch.equal(a, b) for a, b in zip(s, before))             # the taps themselves are not masked
    expected = multilayer_correlation(q, mask_features(s, masks), stage_ids)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not all(torch.equal(a, b) for a, b in zip(got, multilayer_correlation(q, s, stage_ids)))
    if grad:
        sum(c.sum() for c in got).backward()
        assert s[0].grad is not None


def test_correlation_rejects_uneven_support_count():
    with pytest.raises(ValueError):
        multilayer_correlation([torch.randn(2, 3, 4, 4)], [torch.randn(3, 3, 4, 4)], [2])


def test_masked_average_pooling_matches_explicit_sum():
    torch.manual_seed(0)
    feat = torch.randn(3, 5, 6, 7, dtype=torch.float64)
    mask = (torch.rand(3, 24, 28) > 0.5).double()
    small = F.interpolate(mask[:, None], (6, 7), mode='bilinear', align_corners=True)[:, 0]
    expected = torch.stack([
        torch.stack([(feat[n, c] * small[n]).sum() / (small[n].sum() + 1e-5) for c in range(5)]) for n in range(3)])
    assert torch.allclose(masked_average_pooling(feat, mask), expected.to(torch.float64), atol=1e-6)
    # an all-zero mask gives a zero prototype, not NaN
    assert masked_average_pooling(feat, torch.zeros(3, 24, 28)).abs().max() == 0
    # several masks at once ([N,M,h,w] -> [N,M,C]) on a channels-last map, with another eps
    pair = torch.stack([small, 1 - small], dim=1)
    both = masked_average_pooling(feat.contiguous(memory_format=torch.channels_last), pair, eps=1e-6)
    assert both.shape == (3, 2, 5)
    for j in range(2):
        ref = torch.stack([torch.stack([(feat[n, c] * pair[n, j]).sum() / (pair[n, j].sum() + 1e-6)
                                        for c in range(5)]) for n in range(3)])
        assert torch.allclose(both[:, j], ref, atol=1e-12)


def test_resize_mask_and_mask_features():
    mask = torch.zeros(1, 9, 9)
    mask[0, 4, 4] = 1
    small = resize_mask(mask, (5, 5))
    assert small.shape == (1, 1, 5, 5) and small[0, 0, 2, 2] == 1     # align_corners keeps the centre pixel
    assert resize_mask(mask, (9, 9)) is not None and torch.equal(resize_mask(mask, (9, 9))[0, 0], mask[0])
    feats = [torch.ones(1, 2, 5, 5), torch.ones(1, 3, 5, 5), torch.ones(1, 2, 3, 3)]
    out = mask_features(feats, mask)
    assert torch.equal(out[0][0, 0], small[0, 0]) and torch.equal(out[1][0, 2], small[0, 0])
    assert out[2].shape == (1, 2, 3, 3)


@pytest.mark.parametrize('size', [64, 96, 100, 130])
def test_learner_handles_any_input_size(size):
    torch.manual_seed(0)
    learner = HPNLearner([3, 6, 4])
    h2, h3, h4 = (-(-size // 8), -(-size // 16), -(-size // 32))
    corrs = [torch.rand(1, 3, h4, h4, h4, h4), torch.rand(1, 6, h3, h3, h3, h3), torch.rand(1, 4, h2, h2, h2, h2)]
    out = learner(corrs)
    assert out.shape == (1, 2, 2 * h2, 2 * h2)
    assert torch.isfinite(out).all()




# --- GroupNormLast: the learner's channels-last group norm --------------------------------------------------------
def _channels_last(shape: tuple, mean: float, std: float, seed: int = 0) -> torch.Tensor:
    r"""A [B,C,*dims] tensor stored channels-last (memory order B,*dims,C), as the 4D conv writes it."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape[0], *shape[2:], shape[1], generator=gen) * std + mean).movedim(-1, 1)


def _group_norm_pair(channels: int, groups: int = 4):
    from model.layers.learner import GroupNormLast
    torch.manual_seed(1)
    layer = GroupNormLast(groups, channels)
    with torch.no_grad():
        layer.weight.normal_(1, 0.1)
        layer.bias.normal_(0, 0.1)
    reference = torch.nn.GroupNorm(groups, channels).double()
    reference.load_state_dict(layer.state_dict())
    return layer, reference


def test_group_norm_last_is_accurate_on_a_400px_sized_group():
    r"""HSNet's first 4D block at 400x400: [1,16,50,50,13,13], groups of 4 channels = 1.7 M values each. PyTorch's
    channels-last CPU kernel sums them in one float32 pass (2.6e-5 relative error here, 5e-5 with this mean);
    nn.GroupNorm in float64 is the reference."""
    layer, reference = _group_norm_pair(16)
    x = _channels_last((1, 16, 50, 50, 13, 13), mean=3.0, std=2.0)
    with torch.no_grad():
        y, y64 = layer(x), reference(x.double())
    assert y.movedim(1, -1).is_contiguous()                    # the layout the next 4D conv reads, no copy
    error = float((y.double() - y64).norm() / y64.norm())
    assert error < 1e-6, error


@pytest.mark.parametrize('shape', [(2, 8, 3, 5, 2, 3), (1, 16, 9, 7, 1, 1), (3, 4, 2, 2)])
def test_group_norm_last_matches_float64_group_norm_with_gradients(shape):
    r"""Odd sizes, a batch, a large mean (cancellation in sum(x^2) - n mean^2 without the shift), 2D and 4D maps;
    gradients of x, weight and bias against nn.GroupNorm in float64."""
    from model.layers.learner import group_moments
    layer, reference = _group_norm_pair(shape[1], groups=2 if shape[1] == 4 else 4)
    x = _channels_last(shape, mean=50.0, std=1.0).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y, y64 = layer(x), reference(x64)
    # y = x * scale + shift loses ~eps * mean / std, as PyTorch's kernels do; unshifted sums of squares lose 50x more
    error = float((y.detach().double() - y64.detach()).norm() / y64.detach().norm())
    assert error < 1e-5, error
    grad = torch.randn(y64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y.backward(grad.float())
    y64.backward(grad)
    for ours, theirs in ((x.grad, x64.grad), (layer.weight.grad, reference.weight.grad),
                         (layer.bias.grad, reference.bias.grad)):
        error = float((ours.double() - theirs).norm() / theirs.norm())
        assert error < 1e-4, error
    # the statistics themselves, against float64 (not through the normalisation)
    xd = x.detach().double()
    groups = layer.num_groups
    flat = xd.reshape(shape[0], groups, -1)
    mean, var = group_moments(x.detach().movedim(1, -1), groups)
    torch.testing.assert_close(mean, flat.mean(-1), rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(var, flat.var(-1, unbiased=False), rtol=1e-4, atol=0)
