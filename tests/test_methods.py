r"""The method contract, for every entry of METHODS (and a toy prototype method that lives only in this file):
K-shot output shapes, gradients, hook shapes, checkpoint round trip, the alpha = 1 plug-in identity, test-time
adaptation that resets, the one test-time entry point, and HSNet/PATNet outputs bit-identical to the code before
the staged pipeline (tests/golden)."""
import copy
import dataclasses
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from common.checkpoint import save_checkpoint
from engine.factory import build_model, load_model
from model import METHODS, Adaptation, EpisodeRecord, FewShotSegmenter, Hooks, Output, build_method, option
from model.layers import masked_average_pooling, resize_mask
from tests.golden.make import (CASES, CDTG_CASES, CDTG_CLASSES, GOLDEN, cdtg_config, deterministic_init, episode,
                               stand_in_text)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


# --- the worked example of docs/methods.md "Adding a method": a prototype method in one file -----------------
@dataclass
class ToyOptions:
    scale: float = option(10.0, help='cosine scale of the logits', low=0.0)


class ToyProto(FewShotSegmenter):
    r"""A prototype method in ~40 lines: a learned 1x1 projection of the deepest tap, foreground/background
    prototypes by masked average pooling averaged over the K shots (the 'joint' policy), logits = scale * cosine
    to each prototype. Test-time adaptation: a few steps on the projection so that each support predicts its own
    mask (from the supports only), reset after every episode by the shared harness."""
    kshot = 'joint'
    Options = ToyOptions
    plugin_point = 'prototypes'
    adaptation_defaults = Adaptation(steps=0, lr=1e-2)

    def __init__(self, backbone, options=None):
        super().__init__(backbone, options)
        self.proj = nn.Conv2d(backbone.channels[-1], 32, 1)

    @property
    def feature_channels(self):
        return [32]

    @property
    def feature_levels(self):
        return [0]

    def _logits(self, query, support, masks, record) -> torch.Tensor:
        b, k = record.batch, record.nshot
        m = resize_mask(masks, tuple(support.shape[-2:]), support.dtype)
        pooled = masked_average_pooling(support, torch.cat([m, 1 - m], dim=1))           # [B*K,2,C]
        fg = pooled[:, 0].view(b, k, -1).mean(1, keepdim=True)                             # [B,1,C]: shot mean
        bg = pooled[:, 1].view(b, k, -1).mean(1, keepdim=True)
        fg, bg = self.hooks.prototypes([fg], [bg], [support], record.ctx)
        protos = torch.stack([bg[0][:, 0], fg[0][:, 0]], dim=1)                            # [B,2,C]
        cos = torch.einsum('bpc,bchw->bphw', nn.functional.normalize(protos, dim=-1),
                           nn.functional.normalize(query, dim=1))
        return self.upsample(self.options.scale * cos, record)

    def match(self, record: EpisodeRecord) -> Output:
        return Output(self._logits(self.proj(record.query_feats[-1]), self.proj(record.support_feats[-1]),
                                   record.ctx.support_masks, record))

    def adaptation_parameters(self, record):
        return list(self.proj.parameters())

    def adaptation_loss(self, record, step):
        support = self.proj(record.support_feats[-1])                                    # supports predict themselves
        logits = self._logits(support, support, record.ctx.support_masks, record)
        return nn.functional.cross_entropy(logits, record.ctx.support_masks.long())


ALL = sorted(METHODS) + ['toy']


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    monkeypatch.setitem(METHODS, 'toy', ToyProto)


def backbone_of(name: str) -> str:
    r"""The backbone a method's contract runs on: its default, but ResNet-50 for Q-Net (a selectable backbone of its;
    ResNet-101 costs twice as much and changes nothing the contract checks; the parity tests run Q-Net on its
    ResNet-101)."""
    return 'resnet50' if name == 'qnet' else METHODS[name].default_backbone


_MADE: dict = {}


def make(name: str, seed: int = 0) -> FewShotSegmenter:
    r"""Method `name` on `backbone_of(name)` with random weights whose BatchNorm statistics are calibrated on a few
    noise images (as `train.py --bn-calibration`): with the default statistics a random ResNet's layer4 reaches
    ~5e3, which saturates Q-Net's sigmoid (p = 0 everywhere: no gradient, no effect of the plug-in).

    Built once per (name, seed) and handed out as a deep copy, with the global random state the build left behind,
    so every test gets the model (and the random stream) a fresh build would give it."""
    if (name, seed) not in _MADE:
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            model = build_method(name, backbone_of(name), 'none').eval()
        if model.backbone.name != 'vgg16':
            model.backbone.calibrate_bn([torch.randn(4, 3, SIZE, SIZE,
                                                     generator=torch.Generator().manual_seed(seed))])
        _MADE[(name, seed)] = model, torch.get_rng_state()
    model, state = _MADE[(name, seed)]
    torch.set_rng_state(state)
    return copy.deepcopy(model)


def inputs(nshot: int, batch: int = 2, seed: int = 0) -> dict:
    ep = episode(nshot, batch, seed)
    # foreground reaching the bottom-right corner: every tap size (down to 2x2) keeps masked-in support pixels
    ep['support_masks'][..., SIZE // 3:, SIZE // 3:] = 1
    ep['class_id'] = torch.arange(batch) % len(CDTG_CLASSES)
    return ep


def run(model, ep) -> Output:
    return model(ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])


def infer(model, ep) -> torch.Tensor:
    return model.infer(model.encode(ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])).logits


# --- shapes, gradients, hooks -------------------------------------------------------------------------------------
@pytest.mark.parametrize('nshot', [1, 5])
@pytest.mark.parametrize('name', ALL)
@pytest.mark.slow
def test_output_shapes_follow_the_kshot_policy(name, nshot):
    model = make(name)
    ep = inputs(nshot)
    with torch.no_grad():
        out = run(model, ep)
        mask = model.segment(out)
    expected = {'vote': (2, nshot, 2, SIZE, SIZE), 'joint': (2, 2, SIZE, SIZE)}[model.kshot]
    assert tuple(out.logits.shape) == expected and torch.isfinite(out.logits).all()
    assert mask.shape == (2, SIZE, SIZE) and mask.dtype == torch.long and set(mask.unique().tolist()) <= {0, 1}
    terms = model.loss(out, ep)
    assert terms and all(t.dim() == 0 and torch.isfinite(t) for t in terms.values())


@pytest.mark.parametrize('name', ALL)
@pytest.mark.slow
def test_gradients_reach_every_trainable_parameter_and_no_frozen_one(name):
    model = make(name).train()
    ep = inputs(1)
    loss = sum(model.loss(run(model, ep), ep).values())
    loss.backward()
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert trainable
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n
    assert sum(float(p.grad.abs().sum()) for p in trainable.values()) > 0
    moving = model.backbone.moving_batchnorms()          # PMMs' and Q-Net's reference BN modes, see BackboneSpec.bn
    frozen_bn = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d) and m not in moving]
    assert all(not m.training for m in frozen_bn) and all(not p.requires_grad for m in frozen_bn
                                                          for p in m.parameters())
    affine = model.backbone.spec.bn == 'trained'
    assert all(m.training and all(p.requires_grad == affine for p in m.parameters()) for m in moving)
    assert bool(moving) == (name in ('pmms', 'rpmms', 'qnet'))


class ShapeHooks(Hooks):
    r"""Checks every hook call against the documented shapes and passes the inputs through unchanged."""

    def __init__(self, model: FewShotSegmenter, batch: int, nshot: int):
        super().__init__()
        self.model, self.b, self.k, self.calls = model, batch, nshot, []

    def query_features(self, feats, ctx):
        assert [tuple(f.shape[:2]) for f in feats] == [(self.b, c) for c in self.model.backbone.channels]
        self.calls.append('query')
        return feats

    def support_features(self, feats, ctx):
        assert [tuple(f.shape[:2]) for f in feats] == [(self.b * self.k, c) for c in self.model.backbone.channels]
        assert ctx.nshot == self.k and ctx.support_masks.shape[0] == self.b * self.k
        assert ctx.class_id.shape == (self.b,)
        self.calls.append('support')
        return feats

    def prototypes(self, fg, bg, feats, ctx):
        channels = self.model.feature_channels
        assert len(fg) == len(bg) == len(feats) == len(channels)
        for f, g, x, c in zip(fg, bg, feats, channels):
            assert f.dim() == 3 and f.shape[0] in (self.b, self.b * self.k) and f.shape[2] == c and f.shape[1] >= 1
            assert g is None or (g.shape[0] == f.shape[0] and g.shape[2] == c)
            assert x.shape[:2] == (self.b * self.k, c)
        self.calls.append('prototypes')
        return fg, bg


@pytest.mark.parametrize('nshot', [1, 5])
@pytest.mark.parametrize('name', ALL)
@pytest.mark.slow
def test_hooks_are_called_with_the_documented_shapes(name, nshot):
    model = make(name)
    ep = inputs(nshot)
    with torch.no_grad():
        plain = run(model, ep).logits
        hooks = ShapeHooks(model, 2, nshot)
        hooked = run(model.attach(hooks), ep).logits
    assert hooks.calls[:2] == ['query', 'support']
    assert ('prototypes' in hooks.calls) == (model.plugin_point == 'prototypes')
    assert torch.equal(plain, hooked)                                   # identity hooks change nothing


# --- checkpoints, options, the plug-in ------------------------------------------------------------------------------
def _config(name: str, **extra) -> dict:
    config = {'method': name, 'backbone': backbone_of(name), 'img_size': SIZE,
              'benchmark': 'synthetic', 'method_options': {}}
    config.update(extra)
    return config


@pytest.mark.parametrize('name', ALL)
@pytest.mark.slow
def test_checkpoint_round_trip_gives_identical_outputs(name, tmp_path):
    options = {f.name: f.default for f in dataclasses.fields(METHODS[name].Options)}
    model = make(name, seed=3)
    ep = inputs(2)
    save_checkpoint({'model': model.state_dict(), 'config': _config(name, method_options=options), 'epoch': 0},
                    tmp_path / 'best.pt')
    loaded, ckpt = load_model(str(tmp_path / 'best.pt'), torch.device('cpu'))
    assert type(loaded) is type(model) and ckpt['config']['method_options'] == options
    assert dataclasses.asdict(loaded.options) == options
    with torch.no_grad():
        assert torch.equal(run(model, ep).logits, run(loaded, ep).logits)


def test_method_options_are_validated_and_become_flags():
    import train
    with pytest.raises(Exception, match='--scale of ToyProto must lie in'):
        build_method('toy', None, 'none', scale=-1.0)
    with pytest.raises(Exception, match='not an option of method toy'):
        build_method('toy', None, 'none', width=3)
    for name in ALL:                                  # every method's options become flags without a clash
        parser = train.build_parser(name)
        for f in dataclasses.fields(METHODS[name].Options):
            assert any(f'--{f.name.replace("_", "-")}' in a.option_strings for a in parser._actions)
    args = train.build_parser('toy').parse_args(['--method', 'toy', '--scale', '4'])
    assert args.scale == 4.0


@pytest.mark.parametrize('nshot', [1, 5])
@pytest.mark.parametrize('name', ALL)
@pytest.mark.slow
def test_cdtg_at_alpha_one_is_an_identity_on_outputs(name, nshot):
    plain = make(name)
    config = dict(cdtg_config(name, None), alpha=1.0, backbone=backbone_of(name),
                  cdtg_text_bias='bounded')                       # the default of new runs (golden: the template)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        guided = build_model(config, None).eval()
    deterministic_init(guided.hooks, seed=5)                            # plug-in weights random, gates open
    guided.load_state_dict(plain.state_dict(), strict=False)
    guided.hooks.bind('synthetic-med', CDTG_CLASSES)
    ep = inputs(nshot)
    with torch.no_grad():
        assert torch.equal(run(plain, ep).logits, run(guided, ep).logits)
        guided.hooks.config.alpha = 0.5                                # the test can fail: the text does act
        assert not torch.allclose(run(plain, ep).logits, run(guided, ep).logits)


# --- test-time adaptation -----------------------------------------------------------------------------------------
ADAPTING = [name for name in ALL if name == 'toy' or METHODS[name].adapts()]


@pytest.mark.parametrize('name', ADAPTING)
@pytest.mark.slow
def test_adaptation_resets_bit_for_bit_and_ignores_episode_order(name):
    model = make(name)
    e1, e2 = inputs(1, batch=1, seed=11), inputs(1, batch=1, seed=12)
    both = {k: torch.cat([e1[k], e2[k]]) for k in e1}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = infer(model, e1)
    model.set_test_time(finetune_steps=3, finetune_lr=0.05)
    with torch.inference_mode():                                         # as a caller under inference mode
        first = infer(model, e1)
        second = infer(model, e2)
        batched = infer(model, both)
    with torch.no_grad():
        again = infer(model, e1)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)           # every weight and buffer restored
    assert all(p.grad is None for p in model.parameters())
    assert (first - plain).abs().max() > 1e-6                            # the adaptation does something
    assert torch.equal(first, again)                                     # nothing carried over from episode 2
    assert torch.allclose(batched, torch.cat([first, second]), atol=1e-6)   # episodes of a batch adapt apart


@pytest.mark.parametrize('name', [n for n in sorted(METHODS) if METHODS[n].kshot == 'vote'])
@pytest.mark.slow
def test_vote_methods_match_shot_by_shot_like_all_at_once(name):
    model = make(name)
    ep = inputs(3)
    record = model.encode(ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])
    with torch.no_grad():
        model.match_shots = 'all'
        together = model.infer(record).logits
        model.match_shots = 'one'
        apart = model.infer(record).logits
    assert torch.allclose(together, apart, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.segment(Output(together)), model.segment(Output(apart)))


@pytest.mark.parametrize('name', [n for n in sorted(METHODS) if METHODS[n].kshot == 'vote'])
@pytest.mark.slow
def test_streamed_shots_predict_what_the_encoded_episode_predicts(name):
    r"""`infer_episode` with shot-by-shot matching encodes the query once and each support just before its match
    (one backbone pass per image, query first); the logits are those of infer(encode(...)) up to rounding."""
    model = make(name)
    ep = inputs(3)
    args = (ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])
    batches = []
    handle = model.backbone.register_forward_pre_hook(lambda module, x: batches.append(x[0].shape[0]))
    with torch.no_grad():
        model.match_shots = 'all'
        together = model.infer_episode(*args).logits
        assert batches == [2 + 2 * 3]                                  # one pass: 2 queries + 6 supports
        batches.clear()
        model.match_shots = 'one'
        streamed = model.infer_episode(*args).logits
        assert batches == [2, 2, 2, 2]                                 # queries once, then shot by shot
        assert torch.equal(model.predict(*args), model.segment(Output(streamed)))
    handle.remove()
    assert torch.allclose(together, streamed, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.segment(Output(together)), model.segment(Output(streamed)))


def test_set_test_time_refuses_methods_without_adaptation():
    with pytest.raises(Exception, match='no test-time adaptation'):
        make('hsnet').set_test_time(finetune_steps=3)


def test_every_test_time_caller_goes_through_infer(datapath, monkeypatch):
    r"""The evaluation loop (test.py, train.py's validation) and `predict` reach the model only through `infer`
    (the volumetric protocol: tests/test_chaos.py)."""
    from data import FixedEpisodes, build_dataset, build_loader
    from engine.loops import evaluate
    model = make('toy')
    calls, matched, inside = [], [], []
    infer_, match_ = model.infer, model.match

    def spy_infer(record):
        calls.append(record.batch)
        inside.append(True)
        try:
            return infer_(record)
        finally:
            inside.pop()

    def spy_match(record):
        assert inside, 'match called outside infer'
        matched.append(record.batch)
        return match_(record)
    monkeypatch.setattr(model, 'infer', spy_infer)
    monkeypatch.setattr(model, 'match', spy_match)
    ds = build_dataset('synthetic-med', datapath, 'test', 1, SIZE)
    loader = build_loader(ds, FixedEpisodes(ds.sample_episodes(3, 0)), bsz=2, workers=0)
    evaluate(model, loader, torch.device('cpu'), ds.class_names)
    assert calls == [2, 1] and matched == [2, 1]
    ep = inputs(1)
    model.predict(ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])
    assert calls == [2, 1, 2] and matched == [2, 1, 2]


def test_the_episode_pipeline_is_written_once():
    r"""Only model/base.py runs the backbone and the feature hooks: every method, caller and script goes through
    `encode` (so query-once encoding and the plug-in's feature hooks cannot be skipped or forked)."""
    pattern = re.compile(r'\.backbone\(|hooks\.(query|support)_features\(')
    offenders = []
    for path in list((ROOT / 'model').rglob('*.py')) + list((ROOT / 'engine').rglob('*.py')) \
            + list((ROOT / 'scripts').rglob('*.py')) + [ROOT / 'train.py', ROOT / 'test.py']:
        if path.name == 'base.py' and path.parent.name == 'model':
            continue
        if pattern.search(path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


# --- HSNet and PATNet: bit-identical to the code before the staged pipeline -------------------------------------------
GOLD = torch.load(GOLDEN, weights_only=True)


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
@pytest.mark.slow
def test_hsnet_and_patnet_outputs_equal_the_saved_ones(case):
    name, method, options, k, b = case
    gold = GOLD['cases'][name]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = deterministic_init(build_method(method, 'resnet50', 'none', **options)).eval()
    assert {key: tuple(v.shape) for key, v in model.state_dict().items()} == gold['keys']   # old checkpoints fit
    ep = episode(k, b)
    with torch.no_grad():
        out = run(model, ep)
        # bit-identical on the machine that wrote the file; other CPUs may round differently in the last place
        assert torch.allclose(out.logits, gold['logits'], rtol=1e-5, atol=1e-6)
        assert torch.allclose(model.loss(out, ep)['ce'], gold['loss'], rtol=1e-5)
        if 'tfi_logits' in gold:
            model.set_test_time(finetune_steps=3, finetune_lr=0.05)
            assert torch.allclose(infer(model, ep), gold['tfi_logits'], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('case', CDTG_CASES, ids=[c[0] for c in CDTG_CASES])
@pytest.mark.slow
def test_cdtg_hosts_equal_the_saved_outputs(case, tmp_path):
    name, method, k, b = case
    gold = GOLD['cases'][name]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = deterministic_init(build_model(cdtg_config(method, str(tmp_path)), 'none')).eval()
    assert {key: tuple(v.shape) for key, v in model.state_dict().items()} == gold['keys']
    model.hooks.bind('synthetic-med', CDTG_CLASSES)
    stand_in_text(model.hooks)
    ep = episode(k, b)
    ep['class_id'] = torch.arange(b) % len(CDTG_CLASSES)
    with torch.no_grad():
        assert torch.allclose(run(model, ep).logits, gold['logits'], rtol=1e-5, atol=1e-6)


def test_option_specs_read_from_source_equal_the_imported_options():
    r"""train.py -h reads each method's options from its source file (no torch import); the reading must give the
    imported dataclass exactly, for every registered method."""
    from model import OptionSpec, _option_specs_from_source
    for name in ALL:
        if name == 'toy':
            continue
        fields = dataclasses.fields(METHODS[name].Options)
        imported = [OptionSpec(f.name, f.default, **{k: f.metadata.get(k) for k in ('help', 'choices', 'low', 'high')})
                    for f in fields]
        saved = dict.get(METHODS, name)
        dict.__setitem__(METHODS, name, f'{METHODS[name].__module__}:{METHODS[name].__name__}')
        try:
            assert _option_specs_from_source(name) == imported, name
        finally:
            dict.__setitem__(METHODS, name, saved)
