r"""Parity with the public code, without it: each host at its defaults (IFA on its reference's deep-stem ResNet,
`parity.BACKBONES`) reproduces, in float64, the outputs its
reference code gave for the same weights and episodes (tests/golden/parity-<method>.pt, written by
`scripts/parity.py --write-golden` from a clone of the public repository; the reference commit is in the file). For
the methods that vote over K per-shot predictions (HSNet, PATNet, DMTNet) the probabilities are the per-shot ones,
and the voted mask is compared as well. Q-Net's, DMTNet's and IFA's test-time adaptations are compared too
(`parity.ADAPTATIONS`)."""
import warnings

import pytest
import torch

import scripts.parity as parity

pytestmark = pytest.mark.usefixtures('one_thread')
TOLERANCE = 1e-10                   # relative to the largest reference probability (the parity bar)


def relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize('method', sorted(parity.REFERENCES))
@pytest.mark.slow
def test_defaults_reproduce_the_public_code_float64(method):
    golden = torch.load(parity.GOLDEN / f'parity-{method}.pt', weights_only=True)
    assert golden['method'] == method and set(golden['cases']) == set(parity.SHOTS)
    model = parity.our_model(method)
    episodes = parity.episodes(golden['size'], method)
    for k, case in golden['cases'].items():
        ours, mask = parity.our_prediction(model, episodes[k])
        ours, ref = ours[:, 1], case['foreground']
        assert ours.shape == ref.shape
        assert 0.01 < float(ref.std())                           # not a constant map: the comparison can fail
        assert relative(ours, ref) <= TOLERANCE, (method, k, relative(ours, ref))
        if 'mask' in case:                                       # 'vote' methods: the reference's voted mask
            assert 0 < float(case['mask'].double().mean()) < 1   # not a constant mask
            assert torch.equal(mask.bool(), case['mask']), (method, k)


@pytest.mark.parametrize('method', sorted(parity.ADAPTATIONS))
@pytest.mark.slow
def test_test_time_adaptation_reproduces_the_public_code_float64(method):
    r"""Q-Net's refinement, DMTNet's self-finetuning and IFA's adaptation (`parity.ADAPTATIONS`: steps, lr) give the
    reference's adapted outputs; the adaptation moved them visibly, so a no-op adaptation would fail."""
    golden = torch.load(parity.GOLDEN / f'parity-{method}.pt', weights_only=True)
    adaptation = golden['adaptation']
    assert (adaptation['steps'], adaptation['lr']) == parity.ADAPTATIONS[method]
    model = parity.our_model(method)
    model.set_test_time(adaptation['steps'], adaptation['lr'])
    episodes = parity.episodes(golden['size'], method)
    for k, case in adaptation['cases'].items():
        ours, mask = parity.our_prediction(model, episodes[k])
        ref = case['foreground']
        assert float((ref - golden['cases'][k]['foreground']).abs().max()) > 1e-3     # the adaptation moved it
        assert relative(ours[:, 1], ref) <= TOLERANCE, (method, k, relative(ours[:, 1], ref))
        if 'mask' in case:
            assert torch.equal(mask.bool(), case['mask']), (method, k)


@pytest.mark.slow
def test_the_earlier_defaults_are_other_networks():
    r"""The comparison tells networks apart: PMMs with torchvision's geometry and Q-Net with both paths at 1/8 are
    far from their references' outputs."""
    for method, option in (('pmms', {'geometry': 'torchvision'}), ('qnet', {'geometry': 'stride8'})):
        golden = torch.load(parity.GOLDEN / f'parity-{method}.pt', weights_only=True)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            model = parity.our_model(method, **option)
        ours = parity.our_probabilities(model, parity.episodes(golden['size'])[1])[:, 1]
        assert relative(ours, golden['cases'][1]['foreground']) > 1e-3, method


class _OwnCopy(parity.Reference):
    r"""A stand-in for a public network in `--time`: our own model (a copy), its probabilities flipped on request
    (another mask), logging its calls."""

    def __init__(self, model, log: list, flip: bool = False):
        import copy
        self.model, self.log, self.flip = copy.deepcopy(model), log, flip
        self.predict = parity.our_prediction

    def probabilities(self, ep: dict) -> torch.Tensor:
        self.log.append('reference')
        p = self.predict(self.model, ep)[0]
        return p.flip(1) if self.flip else p

    def adapted(self, ep: dict, steps: int, lr: float) -> torch.Tensor:
        self.model.set_test_time(steps, lr)
        try:
            return self.probabilities(ep)
        finally:
            self.model.set_test_time(finetune_steps=0)


@pytest.mark.slow
def test_time_runs_ours_and_the_reference_alternately_in_float32(monkeypatch):
    r"""`--time N`: after a warm-up of each, N pairs in alternating order (ours first, then the reference first),
    1 and 5 shots, plain and with the method's adaptation; both networks in float32; the ratio is of the medians and
    the mask agreement tells a different prediction apart."""
    log, dtypes = [], []
    ours = parity.our_prediction
    model = parity.our_model('ifa')
    references = [_OwnCopy(model, log, flip) for flip in (False, True)]       # before our_prediction is wrapped

    def logged(model, ep):
        log.append('ours')
        dtypes.append((next(model.parameters()).dtype, ep['query_img'].dtype))
        return ours(model, ep)
    monkeypatch.setattr(parity, 'our_prediction', logged)
    monkeypatch.setitem(parity.ADAPTATIONS, 'ifa', (1, 0.05))             # one adaptation step is enough here
    args = parity.argparse.Namespace(method='ifa', size=48, time=2, train_bsz=0)
    for flip, reference in zip((False, True), references):
        log.clear()
        results = parity.time_against_reference(args, model, reference)
        assert set(results) == {(k, a) for k in parity.SHOTS for a in (False, True)}
        pair = ['ours', 'reference', 'ours', 'reference', 'reference', 'ours']         # warm-up, pair 1, pair 2
        assert log == pair * len(results)
        assert next(reference.model.parameters()).dtype == torch.float32
        assert set(dtypes) == {(torch.float32, torch.float32)}
        for r in results.values():
            assert r['ratio'] == pytest.approx(r['ours'] / r['reference']) and r['ours'] > 0
            assert (r['mask_agreement'] < 0.5) if flip else (r['mask_agreement'] == 1.0)
    assert model.adaptation.steps == 0                            # the adaptation is switched off afterwards


@pytest.mark.parametrize('extra, message', [(['--time', '1', '--write-golden'], '--write-golden'),
                                            (['--time', '-1'], '>= 0'), (['--time', '1', '--threads', '0'], '>= 1'),
                                            (['--train-bsz', '2'], 'with --time N'),
                                            (['--time', '1', '--train-bsz', '2'], 'no training step')])
def test_timing_options_are_checked_before_anything_is_built(tmp_path, extra, message):
    with pytest.raises(parity.UserError, match=message):
        parity.main(['--method', 'pmms', '--reference-code', str(tmp_path / 'absent')] + extra)


@pytest.mark.slow
def test_train_bsz_times_our_training_step_against_the_references():
    r"""`--time N --train-bsz B`: N pairs (after a warm-up of each) of our training step, which moves our weights,
    and the reference's `train_step` on the same B one-shot episodes at --size."""
    model = parity.our_model('hsnet').float()
    before = [p.detach().clone() for p in model.trainable_parameters()]
    seen = []

    class Stub(parity.Reference):
        def __init__(self):
            self.model = torch.nn.Linear(1, 1)

        def train_step(self, ep, optimizer):
            seen.append((ep['query_img'].shape, type(optimizer).__name__))

    args = parity.argparse.Namespace(method='hsnet', size=48, time=2, train_bsz=2)
    r = parity.time_training(args, model, Stub())
    assert seen == [((2, 3, 48, 48), 'Adam')] * 3                              # warm-up + 2 pairs
    assert r['ratio'] == pytest.approx(r['ours'] / r['reference']) and r['ours'] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.trainable_parameters()))
