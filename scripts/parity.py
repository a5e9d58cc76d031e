r"""Parity with the public code: build a method's reference model from its own repository, copy our weights into it
and compare the two networks' outputs on the same episodes in float64.

    git clone https://github.com/Yang-Bob/PMMs /tmp/PMMs
    python scripts/parity.py --method pmms --reference-code /tmp/PMMs            # 1- and 5-shot, at our defaults
    python scripts/parity.py --method qnet --reference-code /tmp/Q-Net --size 96
    python scripts/parity.py --method rpmms --reference-code /tmp/PMMs --write-golden   # tests/golden/parity-rpmms.pt
    python scripts/parity.py --method dmtnet --reference-code /tmp/DMTNet      # --size 100: its grid needs taps >= 4 px
    python scripts/parity.py --method pmms --reference-code /tmp/PMMs --time 3  # float32 timing, 400x400, 1 thread
    python scripts/parity.py --method hsnet --reference-code /tmp/hsnet --time 3 --train-bsz 2   # + a training step

Both models get the same deterministic weights (`tests/golden/make.py: deterministic_init`, by parameter name), so
the comparison needs no download. The reference is imported from its folder as published (a package named like
ours, `model`, is imported in its place while the reference is built), with only these run-time patches: `.cuda()`
is the identity; torchvision's `pretrained=True` / `weights=` downloads are replaced by random initialisations (our
weights are copied over them; PMMs, HSNet, PATNet, DMTNet); the EM initialisation that the reference draws at random
is set to ours (PMMs, RPMMs); Q-Net's path weights (a float32 tensor attribute that `.double()` does not convert) are
float64; PATNet's, DMTNet's and IFA's `.float()` casts of the binary support masks give float64 (`float_as_double`:
else the masks are resized with float32 weights, ~4e-8 relative in PATNet's probabilities; HSNet's are left: its
masks only scale support pixels, which its cosines normalise away); IFA's weight file (./pretrained/<backbone>.pth,
always requested) is not read.
Printed per case: max |Δ| and max |Δ| / max |ref| of the probabilities the reference predicts, and the agreement of
the two argmax masks. HSNet, PATNet and DMTNet predict K shots by a vote over per-shot predictions, so there the
probabilities are the per-shot ones ([B*K,2,H,W]: the reference's forward per shot inside its `predict_mask_nshot`)
and the voted masks are compared too; DMTNet on half-plane episodes (`half_plane_episode`, else its query
pseudo-masks are empty on these weights). Methods with a test-time adaptation (`ADAPTATIONS`: Q-Net's refinement,
DMTNet's self-finetuning, IFA's adaptation) are compared a second time with it, from fresh optimiser state on each
side (the reference's own loops are replayed for one episode: `QNetReference.adapted`, `DMTNetReference.adapted`,
`IFAReference.adapted`), and the line says how far the adaptation moved the reference's probabilities.
`--write-golden` stores the reference outputs with the episode seeds, so that tests/test_parity.py checks parity in CI
without the public code.

IFA is compared on the reference's deep-stem ResNet (`--backbone resnet50-deep`, see `IFAReference`).

Repositories (the commits the golden files were written with): pmms, rpmms: Yang-Bob/PMMs @100d66b; qnet:
shenqq377/Q-Net @70a828d; hsnet: juhongm999/hsnet @6b1bc12; patnet: slei109/PATNet @0155c5f; dmtnet:
ChenJiayi68/DMTNet @2358ce9 (at --size 100); ifa: niejiahao1998/IFA @4d5cbe6.
"""
import argparse
import contextlib
import importlib
import importlib.machinery
import importlib.util
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common.errors import UserError, run_cli  # noqa: E402

GOLDEN = ROOT / 'tests' / 'golden'
SHOTS = (1, 5)
#: The image side `--time` uses by default (the performance issue's and scripts/bench.py's).
TIME_SIZE = 400


# --- importing the reference ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def no_cuda():
    r"""`.cuda()` as the identity (the reference code moves tensors to the GPU unconditionally)."""
    saved = (torch.Tensor.cuda, nn.Module.cuda)
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda = saved


@contextlib.contextmanager
def reference_imports(folder: Path, packages: tuple[str, ...], shadowed: tuple[str, ...] = ()):
    r"""Import `packages` from the reference's folder (appended to sys.path, so our own top-level packages win);
    the imported modules are dropped afterwards, so references with the same package names (`models`) do not
    clash. `shadowed`: packages the reference names as we do (`model`): during the import our modules of that name
    step aside for the reference's package (put in sys.modules directly: a folder without __init__.py would lose
    to our regular package wherever it stood on sys.path), afterwards they are back; the reference's objects keep
    their own modules."""
    if not folder.is_dir():
        raise UserError(f'--reference-code {folder}: no such folder (clone the method\'s public repository there)')
    ours = {name: module for name, module in sys.modules.items() if name.split('.')[0] in shadowed}
    for name in ours:
        del sys.modules[name]
    for name in shadowed:
        init, where = folder / name / '__init__.py', [str(folder / name)]
        if init.is_file():
            spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=where)
        else:                                                            # a namespace package
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = where
        sys.modules[name] = importlib.util.module_from_spec(spec)
        if spec.loader is not None:
            spec.loader.exec_module(sys.modules[name])
    sys.path.append(str(folder))
    try:
        with no_cuda():
            yield
    finally:
        sys.path.remove(str(folder))
        for name in list(sys.modules):
            if name.split('.')[0] in packages + shadowed:
                del sys.modules[name]
        sys.modules.update(ours)


@contextlib.contextmanager
def random_resnets(*modules):
    r"""torchvision's `resnet50` / `resnet101`, as reached through `modules` (torchvision.models or its `resnet`
    submodule), build random initialisations: the reference's `pretrained=True` or `weights=...` would download
    ImageNet weights, and ours are copied over them anyway."""
    def randomly_initialised(build):
        def resnet(pretrained=None, weights=None, **kw):
            return build(weights=None, **kw)
        return resnet

    saved = [(m, name, getattr(m, name)) for m in modules for name in ('resnet50', 'resnet101')]
    for module, name, build in saved:
        setattr(module, name, randomly_initialised(build))
    try:
        yield
    finally:
        for module, name, build in saved:
            setattr(module, name, build)


@contextlib.contextmanager
def float_as_double():
    r"""`Tensor.float()` converts to float64: the reference casts its binary support masks with `.float()` before
    resizing them, which in a float64 comparison resizes them with float32 weights (relative ~1e-8 in the
    probabilities). On {0, 1} masks the cast itself is exact, so only the interpolation's precision changes."""
    saved = torch.Tensor.float
    torch.Tensor.float = lambda self, *args, **kw: self.double(*args, **kw)
    try:
        yield
    finally:
        torch.Tensor.float = saved


class Reference:
    r"""A method's public network with our weights (`self.model`), float64 unless `to` says otherwise."""

    dtype = torch.float64

    def to(self, dtype: torch.dtype) -> 'Reference':
        r"""The network in `dtype` (float32: `--time`, which times the networks as they run)."""
        self.model.to(dtype)
        self.dtype = dtype
        return self

    def mask_casts(self):
        r"""The reference's `.float()` mask casts as float64 while the comparison is in float64 (`float_as_double`),
        as written otherwise."""
        return float_as_double() if self.dtype == torch.float64 else contextlib.nullcontext()


def _import(module: str, folder: Path):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f'could not import {module} from --reference-code {folder} ({err}); is it a clone of the '
                        'method\'s public repository?') from err


def copy_into(target: nn.Module, state: dict, mapping: list[tuple[str, str]], unused: tuple[str, ...] = ()) -> None:
    r"""Copy `state` (ours) into `target` (the reference) by (our prefix, reference prefix) pairs; every reference
    tensor must be written exactly once (else the mapping is incomplete), except those under the prefixes `unused`:
    tensors the reference builds but its forward never reads (torchvision's classifier `fc` behind a feature
    extractor, the bias of an `nn.Linear` of which only the weight is used), which have no counterpart of ours."""
    ref = target.state_dict()
    missing = [p for p in unused if not any(k == p or k.startswith(p + '.') for k in ref)]
    if missing:
        raise KeyError(f'unused reference tensors {missing}: not in the reference')
    written = set()
    for key, value in state.items():
        for ours, theirs in mapping:
            if key == ours or key.startswith(ours + '.'):
                name = theirs + key[len(ours):]
                if name not in ref or ref[name].shape != value.shape:
                    raise KeyError(f'{key} -> {name}: not in the reference or another shape')
                ref[name] = value.clone()
                written.add(name)
                break
    left = [k for k in ref if k not in written and not k.endswith('num_batches_tracked')
            and not any(k == p or k.startswith(p + '.') for p in unused)]
    if left:
        raise KeyError(f'reference tensors without a value: {left[:5]} ({len(left)})')
    target.load_state_dict(ref)


# --- PMMs / RPMMs (Yang-Bob/PMMs) -------------------------------------------------------------------------------------
def _pmms_mapping(cascade: bool) -> list[tuple[str, str]]:
    mapping = [('backbone.net', 'model_res'), ('fuse', 'layer5'), ('compare', 'layer55.0'),
               ('merge.0', 'layer56.0'), ('classifier', 'layer9'), ('project.0', 'layer7.0')]
    if not cascade:
        mapping += [('compare_post', 'layer55.1'), ('merge.1', 'layer56.1'), ('project.1', 'layer7.1')]
    for i in range(3):
        mapping += [(f'residual.{i}.conv1', f'residule{i + 1}.1'), (f'residual.{i}.conv2', f'residule{i + 1}.3')]
    for i in range(5):
        mapping.append((f'psp.branches.{i}', f'layer6.layer6_{i}.0'))
    return mapping


class PMMsReference(Reference):
    r"""networks/FPMMs.py (pmms) or networks/FRPMMs.py (rpmms): `forward` for one shot, `forward_5shot` for K."""

    packages = ('models', 'networks')

    def __init__(self, method: str, ours, folder: Path):
        import torchvision
        self.cascade = method == 'rpmms'
        with reference_imports(folder, self.packages):
            net = _import('networks.FRPMMs' if self.cascade else 'networks.FPMMs', folder)
            pmms = _import('models.PMMs', folder)
            with random_resnets(torchvision.models):
                self.model = net.OneModel(argparse.Namespace(batch_size=1))
            self.pmms_class = pmms.PMMs
        state = {k: v for k, v in ours.state_dict().items() if not k.startswith('em_init_')}
        copy_into(self.model, state, _pmms_mapping(self.cascade))
        self.model.double().eval()
        # the EM initialisation: the reference draws mu at random in PMMs.__init__ (RPMMs: in every forward); ours
        self.inits = {int(k[len('em_init_'):]): v.double() for k, v in ours.state_dict().items()
                      if k.startswith('em_init_')}
        if not self.cascade:
            self.model.PMMs.mu = self.inits[self.model.num_pro][None]

    def to(self, dtype: torch.dtype) -> 'PMMsReference':
        self.inits = {k: v.to(dtype) for k, v in self.inits.items()}
        if not self.cascade:                                  # a plain tensor attribute, which Module.to leaves
            self.model.PMMs.mu = self.inits[self.model.num_pro][None]
        return super().to(dtype)

    def probabilities(self, ep: dict) -> torch.Tensor:
        cls, inits = self.pmms_class, self.inits
        init = cls.__init__

        def seeded(module, c, k=3, stage_num=10):                   # RPMMs builds PMMs(256, k) in every forward
            init(module, c, k, stage_num)
            module.mu = inits[k][None]

        cls.__init__ = seeded
        try:
            with torch.no_grad(), no_cuda():
                q, s, m = ep['query_img'], ep['support_imgs'], ep['support_masks'].unsqueeze(2)
                self.model.batch_size = q.shape[0]
                if s.shape[1] == 1:
                    out = self.model(q, s[:, 0], m[:, 0])[-1]
                    return torch.softmax(F.interpolate(out, q.shape[-2:], mode='bilinear'), dim=1)    # get_pred
                out = self.model.forward_5shot(q, s, m)[-1]
                if self.cascade:                # the mean of the stages' softmax (the reference's argmax)
                    return F.interpolate(out * 5 / 3, q.shape[-2:], mode='bilinear')
                return torch.softmax(F.interpolate(out, q.shape[-2:], mode='bilinear'), dim=1)
        finally:
            cls.__init__ = init


# --- Q-Net (shenqq377/Q-Net) ------------------------------------------------------------------------------------------
class QNetReference(Reference):
    r"""models/fewshot.py's FewShotSeg with its ResNet-101 encoder (no pretrained file: ours are copied in); the
    prediction without refinement (`n_iters=0`, ours: `--finetune-steps 0`)."""

    packages = ('models',)

    def __init__(self, method: str, ours, folder: Path):
        with reference_imports(folder, self.packages):
            fewshot = _import('models.fewshot', folder)
            self.model = fewshot.FewShotSeg(pretrained_weights=None)
        self.model.device = torch.device('cpu')
        mapping = [('backbone.net', 'encoder.backbone'), ('reduce.0', 'encoder.reduce1'),
                   ('reduce.1', 'encoder.reduce2'), ('threshold_head', 'encoder.reduce1d')]
        copy_into(self.model, ours.state_dict(), mapping)
        self.model.double().eval()
        # its path weights are a plain float32 tensor attribute, which .double() leaves (0.9 -> 0.89999998)
        self.model.alpha = torch.tensor([0.9, 0.1], dtype=torch.float64)

    def to(self, dtype: torch.dtype) -> 'QNetReference':
        self.model.alpha = torch.tensor([0.9, 0.1], dtype=dtype)
        return super().to(dtype)

    def probabilities(self, ep: dict, n_iters: int = 0) -> torch.Tensor:
        q, s, m = ep['query_img'], ep['support_imgs'], ep['support_masks']
        outs = []
        with torch.no_grad():
            for b in range(q.shape[0]):                   # the reference mixes the episodes of a batch: one at a time
                supp = [[s[b:b + 1, k] for k in range(s.shape[1])]]
                mask = [[m[b:b + 1, k] for k in range(s.shape[1])]]
                outs.append(self.model(supp, mask, [q[b:b + 1]], train=False, n_iters=n_iters)[0])
        return torch.cat(outs)

    def adapted(self, ep: dict, steps: int, lr: float) -> torch.Tensor:
        r"""With `steps` refinement steps (`n_iters`; the reference's Adam lr is 0.01, fixed in `updatePrototype`)."""
        if lr != 0.01:
            raise ValueError(f'the Q-Net reference refines at lr 0.01, not {lr}')
        return self.probabilities(ep, n_iters=steps)


# --- HSNet, PATNet, DMTNet (juhongm999/hsnet, slei109/PATNet, ChenJiayi68/DMTNet) -----------------------------------
def _learner_mapping(ours: str = 'learner', theirs: str = 'hpn_learner') -> list[tuple[str, str]]:
    r"""Our HPNLearner -> HSNet's `HPNLearner` (PATNet and DMTNet use it unchanged): squeeze.0-2, mix43, mix32 are
    encoder_layer4, 3, 2, encoder_layer4to3, encoder_layer3to2 (Conv4d, GroupNorm, ReLU three times); a 4D
    convolution's conv_query / conv_support are its conv1 / conv2; the decoders keep their names."""
    blocks = {'squeeze.0': 'encoder_layer4', 'squeeze.1': 'encoder_layer3', 'squeeze.2': 'encoder_layer2',
              'mix43': 'encoder_layer4to3', 'mix32': 'encoder_layer3to2'}
    mapping = []
    for a, b in blocks.items():
        for i in (0, 3, 6):
            mapping += [(f'{ours}.{a}.{i}.conv_query', f'{theirs}.{b}.{i}.conv1'),
                        (f'{ours}.{a}.{i}.conv_support', f'{theirs}.{b}.{i}.conv2'),
                        (f'{ours}.{a}.{i + 1}', f'{theirs}.{b}.{i + 1}')]
    return mapping + [(f'{ours}.decoder1', f'{theirs}.decoder1'), (f'{ours}.decoder2', f'{theirs}.decoder2')]


class VoteReference(Reference):
    r"""HSNet's family: the reference's `forward(query, support, mask)` predicts from one shot and its
    `predict_mask_nshot(batch, K)` runs one forward per shot, then HSNet's vote (our 'vote' policy). Its K-shot
    prediction is a mask, so two things are compared: the per-shot probabilities [B*K,2,H,W] (row b*K+k; softmax of
    the logits each of those forwards returns, recorded by a forward hook) and the voted mask [B,H,W] (`vote`).
    The backbone is torchvision's ResNet (`pretrained=True` / `weights=` patched to a random initialisation). The
    reference casts its support masks with `.float()` before resizing them: patched to float64 (`float_as_double`)
    where that matters (`float64_masks`)."""

    module = ''
    float64_masks = True
    anchor_mapping: list[tuple[str, str]] = []
    unused: tuple[str, ...] = ('backbone.fc',)

    def __init__(self, method: str, ours, folder: Path):
        import torchvision
        with reference_imports(folder, (), shadowed=('model',)):
            module = _import(self.module, folder)
            with random_resnets(torchvision.models.resnet):
                self.model = self.build(module, ours.backbone.name)
        mapping = [('backbone.net', 'backbone')] + _learner_mapping() + self.anchor_mapping
        copy_into(self.model, ours.state_dict(), mapping, self.unused)
        self.model.double().eval()
        self.logits = []
        self.model.register_forward_hook(lambda module, args, out: self.logits.append(
            out[0] if isinstance(out, tuple) else out))

    def build(self, module, backbone: str) -> nn.Module:
        raise NotImplementedError

    def mask_casts(self):
        return super().mask_casts() if self.float64_masks else contextlib.nullcontext()

    def vote(self, ep: dict) -> tuple[torch.Tensor, torch.Tensor]:
        r"""(per-shot probabilities [B*K,2,H,W], the voted mask [B,H,W]) from one `predict_mask_nshot`."""
        batch = {key: ep[key] for key in ('query_img', 'support_imgs', 'support_masks')}
        self.logits.clear()
        with torch.no_grad(), no_cuda(), self.mask_casts():
            mask = self.model.predict_mask_nshot(batch, ep['support_imgs'].shape[1])
        mask = mask[0] if isinstance(mask, tuple) else mask              # DMTNet also returns the per-shot logits
        return torch.softmax(torch.stack(self.logits, dim=1), dim=2).flatten(0, 1), mask.long()

    def probabilities(self, ep: dict) -> torch.Tensor:
        return self.vote(ep)[0]

    def train_step(self, ep: dict, optimizer) -> None:
        r"""One step of the reference's train.py: `train_mode()` (the backbone's BatchNorm stays in eval mode), its
        one-shot forward, `compute_objective` (cross-entropy) on the query mask, `backward`, the optimizer's step."""
        self.model.train_mode()
        try:
            with no_cuda(), self.mask_casts():
                logits = self.model(ep['query_img'], ep['support_imgs'][:, 0], ep['support_masks'][:, 0])
                logits = logits[0] if isinstance(logits, tuple) else logits
                loss = self.model.compute_objective(logits, ep['query_mask'])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        finally:
            self.model.eval()
            self.logits.clear()                              # the forward hook's record (and its graph)


class HSNetReference(VoteReference):
    r"""model/hsnet.py's HypercorrSqueezeNetwork(backbone, use_original_imgsize=False). Its float32 masks are left
    as they are: they only scale support pixels, which the cosine normalises away (relative 4e-14 with them)."""

    module = 'model.hsnet'
    float64_masks = False

    def build(self, module, backbone):
        return module.HypercorrSqueezeNetwork(backbone, False)


class PATNetReference(VoteReference):
    r"""model/patnet.py's PATNetwork(backbone): the anchors are the weights of its reference_layer1-3 (nn.Linear;
    their biases never enter the graph)."""

    module = 'model.patnet'
    anchor_mapping = [(f'anchors.{i}', f'reference_layer{i + 1}.weight') for i in range(3)]
    unused = ('backbone.fc',) + tuple(f'reference_layer{i}.bias' for i in (1, 2, 3))

    def build(self, module, backbone):
        return module.PATNetwork(backbone)


class DMTNetReference(VoteReference):
    r"""model/dmtnet.py's DMTNetwork(backbone): support anchors reference_layer1-3, query anchors reference_layer4-6
    (weights only, as PATNet); its anchor dropout is off in eval mode. Its grid prototypes need every tap at least 4
    pixels wide (`get_grid(..., grid_num=4)` steps by side // 4, a zero step below): --size 97 or more for
    ResNet-50 (layer4 at 1/32)."""

    module = 'model.dmtnet'
    default_size, min_size = 100, 97
    anchor_mapping = PATNetReference.anchor_mapping + [(f'query_anchors.{i}', f'reference_layer{i + 4}.weight')
                                                      for i in range(3)]
    unused = ('backbone.fc',) + tuple(f'reference_layer{i}.bias' for i in range(1, 7))

    def build(self, module, backbone):
        return module.DMTNetwork(backbone)

    def adapted(self, ep: dict, steps: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        r"""`vote` after `steps` steps of the reference's test-time self-finetuning (test_finetuning.py:17-44: Adam on
        `hpn_learner.encoder_layer4to3.7.weight` and `encoder_layer3to2.7.weight`, every other parameter frozen, the
        loss `compute_objective_finetuning` of `predict_mask_nshot_support`), from a fresh optimizer as on its first
        test batch; the weights are restored afterwards. In eval mode: test_finetuning.py never calls `eval()`, so
        its anchor dropout (p 0.2) stays on while it tests, which no comparison can reproduce."""
        learner = self.model.hpn_learner
        params = [learner.encoder_layer4to3[7].weight, learner.encoder_layer3to2[7].weight]
        return _adapt_then(self.model, params, torch.optim.Adam(params, lr=lr), steps,
                           lambda: self._finetuning_loss(ep), lambda: self.vote(ep))

    def _finetuning_loss(self, ep: dict) -> torch.Tensor:
        batch = {key: ep[key] for key in ('query_img', 'support_imgs', 'support_masks')}
        k = ep['support_imgs'].shape[1]
        with no_cuda(), self.mask_casts():
            _, logits = self.model.predict_mask_nshot_support(batch, k)
        return self.model.compute_objective_finetuning(logits, batch['support_masks'].clone(), k)


def _adapt_then(model: nn.Module, params: list[torch.Tensor], optimizer, steps: int, loss, predict):
    r"""`steps` optimizer steps on `loss()` with only `params` trainable, then `predict()`; every parameter and its
    requires_grad flag restored afterwards."""
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for _ in range(steps):
            optimizer.zero_grad()
            with torch.enable_grad():
                loss().backward()
            optimizer.step()
        return predict()
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(saved[name])
                p.requires_grad_(flags[name])


# --- IFA (niejiahao1998/IFA) ------------------------------------------------------------------------------------------
class IFAReference(Reference):
    r"""model/IFA_matching.py's IFA_MatchingNet(backbone, refine=True) (all.sh trains and tests with --refine; ours
    always refines); the prediction is `forward(supports, masks, query, None)[0]` (test.py).

    The reference's ResNet (model/resnet.py) always has PSPNet's deep stem (3x3 convs 3-64-64-128), so ours is
    compared with `--backbone resnet50-deep` (`BACKBONES`; IFA's default backbone keeps torchvision's 7x7 stem, whose
    ImageNet weights download, while the deep-stem weights are a file the user fetches). `IFA_MatchingNet` always
    reads ./pretrained/<backbone>.pth: built here without it (ours are copied in). Its masks are cast with
    `.float()` (patched to float64, `float_as_double`)."""

    def __init__(self, method: str, ours, folder: Path):
        name = ours.backbone.name
        if not name.endswith('-deep'):
            raise UserError(f'the IFA reference has a deep-stem ResNet; compare it with --backbone {name}-deep')
        base = name.removesuffix('-deep')
        with reference_imports(folder, (), shadowed=('model',)):
            matching = _import('model.IFA_matching', folder)
            build = getattr(matching.resnet, base)
            setattr(matching.resnet, base, lambda pretrained=False: build(pretrained=False))    # no weight file
            try:
                self.model = matching.IFA_MatchingNet(base, refine=True)
            finally:
                setattr(matching.resnet, base, build)
        mapping = [('backbone.net.conv1', 'layer0.0'), ('backbone.net.bn1', 'layer0.1')]
        mapping += [(f'backbone.net.layer{i}', f'layer{i}') for i in (1, 2, 3)]
        copy_into(self.model, ours.state_dict(), mapping)
        self.model.double().eval()

    def probabilities(self, ep: dict) -> torch.Tensor:
        q, s, m = ep['query_img'], ep['support_imgs'], ep['support_masks']
        k = s.shape[1]
        with torch.no_grad(), no_cuda(), self.mask_casts():
            out = self.model([s[:, i] for i in range(k)], [m[:, i] for i in range(k)], q, None)[0]
        return torch.softmax(out, dim=1)

    def adapted(self, ep: dict, steps: int, lr: float) -> torch.Tensor:
        r"""The prediction after `steps` steps of the reference's target adaptation (ifa.py:160-221: SGD, momentum
        0.9, weight decay 5e-4, on every parameter but layer0, layer1 and BatchNorm; train mode with BatchNorm in
        eval mode; the 3-iteration loss) on the pseudo-episodes ours draws (`IFA.adaptation_loss`: step t takes
        support k and `pseudo_query_augmentation` from a generator seeded t): the reference's own loader draws them
        unseeded from the test pool, ours from the episode's supports, so the two get the same pseudo-episodes and
        the comparison is of the objective and the update."""
        frozen = {id(p) for part in (self.model.layer0, self.model.layer1) for p in part.parameters()}
        frozen |= {id(p) for m in self.model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
        params = [p for p in self.model.parameters() if id(p) not in frozen]
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
        steps_done = iter(range(steps))

        def loss() -> torch.Tensor:
            self.model.train()
            for module in self.model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
            try:
                return self._adaptation_loss(ep, next(steps_done))
            finally:
                self.model.eval()
        return _adapt_then(self.model, params, optimizer, steps, loss, lambda: self.probabilities(ep))

    def _adaptation_loss(self, ep: dict, step: int) -> torch.Tensor:
        from model.ifa import pseudo_query_augmentation
        s, m = ep['support_imgs'][0], ep['support_masks'][0]                              # [K,3,H,W], [K,H,W]
        gen = torch.Generator().manual_seed(step)
        k = int(torch.randint(s.shape[0], (1,), generator=gen)) if s.shape[0] > 1 else 0
        img_q, mask_q = pseudo_query_augmentation(s[k], m[k], gen)
        img_q, mask_q = img_q[None], mask_q[None].long()
        self.model.shot = s.shape[0]                  # ifa.py builds IFA_MatchingNet(backbone, refine, args.shot)
        with no_cuda(), self.mask_casts():
            out = self.model([s[i:i + 1] for i in range(s.shape[0])], [m[i:i + 1] for i in range(s.shape[0])], img_q,
                             mask_q)
        ce = nn.CrossEntropyLoss(ignore_index=255)
        mask_s = m.long()
        return (ce(out[0], mask_q) + ce(out[1], mask_q) + ce(out[2], mask_q) + 0.2 * ce(out[3], mask_s)
                + 0.4 * ce(out[4], mask_s) + 0.1 * (ce(out[5], mask_q) + ce(out[6], mask_s) + ce(out[7], mask_q)
                                                    + ce(out[8], mask_s)))


REFERENCES = {'pmms': PMMsReference, 'rpmms': PMMsReference, 'qnet': QNetReference, 'hsnet': HSNetReference,
              'patnet': PATNetReference, 'dmtnet': DMTNetReference, 'ifa': IFAReference}
#: The reference's backbone where ours is not the method's default (Q-Net's default is ResNet-101 too).
BACKBONES = {'qnet': 'resnet101', 'ifa': 'resnet50-deep'}
#: Test-time adaptations compared (steps, lr): Q-Net's released refinement (test.py n_iters 7, lr 0.01); DMTNet's
#: self-finetuning at its Chest X-ray lr (one step; its other targets' 1e-6 moves nothing visible in float64 on these
#: weights); IFA's adaptation, two steps at an lr that moves these random weights visibly (its 5e-4 over a test pool).
ADAPTATIONS = {'qnet': (7, 0.01), 'dmtnet': (1, 0.1), 'ifa': (2, 0.05)}


# --- the comparison ---------------------------------------------------------------------------------------------------
def our_model(method: str, **options):
    r"""Our `method` at its defaults (or `options`) with the deterministic weights, float64, no test-time
    adaptation."""
    import warnings

    from model import build_method
    from tests.golden.make import deterministic_init
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = build_method(method, BACKBONES.get(method), 'none', **options)
    persistent = set(model.state_dict())
    constants = {n: b.clone() for n, b in model.named_buffers() if n not in persistent}   # constants, not weights
    deterministic_init(model)
    for name, value in constants.items():
        model.get_buffer(name).copy_(value)
    if method == 'qnet':         # cos(f_q, FP) ~ 0.91 on these weights: a threshold that keeps p off 0 and 1
        with torch.no_grad():
            model.threshold_head.bias.fill_(-18.0)
    if method in ('hsnet', 'patnet', 'dmtnet'):
        # fg - bg logits lie in about [0, 1] on these weights (every pixel foreground): the last decoder bias moves
        # them by -0.57, so that the argmax and the vote split the query
        with torch.no_grad():
            model.learner.decoder2[-1].bias.copy_(torch.tensor([0.0, -0.5]))
    model.set_test_time(finetune_steps=0)
    return model.double().eval()


#: Methods compared on `half_plane_episode`s instead of the default episodes' ellipses.
HALF_PLANES = ('dmtnet',)


def episodes(size: int, method: str | None = None) -> dict:
    r"""shots -> one episode (seed = shots) at `size`, float64 (`method` in HALF_PLANES: `half_plane_episode`)."""
    from tests.golden.make import episode
    out = {k: {key: v.double() if v.is_floating_point() else v for key, v in episode(k, 1, k, size).items()}
           for k in SHOTS}
    return {k: half_plane_episode(ep) for k, ep in out.items()} if method in HALF_PLANES else out


def half_plane_episode(ep: dict, contrast: float = 2.0) -> dict:
    r"""The episode with half-plane masks (image j of the query and K supports: the pixels on one side of a line
    through the centre at angle 0.3 + 2πj/(K+1)) and its images brightened by `contrast` inside them.

    DMTNet's query pseudo-mask compares, per pixel, the mean cosine to the grid cells' foreground prototypes with the
    mean to their background prototypes, and a cell without foreground counts as a zero prototype: on the default
    episodes (an ellipse that leaves most cells without foreground) and these random weights the pseudo-mask is
    empty at every tap, which leaves the query-side transform degenerate (FP_q = 0) and the grid untested. Masks
    that split every tap's grid evenly give mixed pseudo-masks."""
    import math
    b, k, _, h, w = ep['support_imgs'].shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64),
                            torch.linspace(-1, 1, w, dtype=torch.float64), indexing='ij')
    angles = 0.3 + 2 * math.pi * torch.arange(k + 1, dtype=torch.float64) / (k + 1)
    masks = (angles.cos()[:, None, None] * xx + angles.sin()[:, None, None] * yy < 0).double()        # [K+1,H,W]
    support_masks = masks[1:].expand(b, k, h, w).clone()
    return {**ep, 'query_img': ep['query_img'] + contrast * masks[0], 'query_mask': masks[0].long().expand(b, h, w),
            'support_imgs': ep['support_imgs'] + contrast * support_masks[:, :, None],
            'support_masks': support_masks}


def our_prediction(model, ep: dict) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Our probabilities [B,2,H,W] ('vote' methods: per shot, [B*K,2,H,W] with row b*K+k, as `VoteReference`)
    and our predicted mask [B,H,W] (the method's K-shot policy)."""
    with torch.no_grad():
        record = model.encode(ep['query_img'], ep['support_imgs'], ep['support_masks'], ep['class_id'])
        output = model.infer(record)
    probabilities = torch.softmax(output.logits, dim=-3)                     # [B,2,H,W] or [B,K,2,H,W]
    if probabilities.dim() == 5:
        probabilities = probabilities.flatten(0, 1)
    return probabilities, model.segment(output)


def our_probabilities(model, ep: dict) -> torch.Tensor:
    return our_prediction(model, ep)[0]


def compare(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    delta = float((ours - ref).abs().max())
    return {'max_abs': delta, 'max_rel': delta / max(float(ref.abs().max()), 1e-300),
            'argmax_agreement': float((ours.argmax(1) == ref.argmax(1)).double().mean())}


def time_against_reference(args, model, reference) -> dict:
    r"""`--time N`: our test episode and the reference's, float32, N pairs timed alternately (ours first in even
    pairs, the reference first in odd ones, after a warm-up of each), at 1 and 5 shots and, for a method with a
    test-time adaptation, with it too (`ADAPTATIONS`). Prints and returns the medians and their ratio, with the
    agreement of the two predicted masks in float32 (a check that the two timed the same prediction)."""
    from scripts.bench import interleaved
    model.float()
    reference.to(torch.float32)
    device = torch.device('cpu')
    adaptation = ADAPTATIONS.get(args.method)
    results = {}
    for k, ep in episodes(args.size, args.method).items():
        ep = {key: v.float() if v.is_floating_point() else v for key, v in ep.items()}
        for adapted in (False, True) if adaptation else (False,):
            model.set_test_time(*(adaptation if adapted else (0,)))
            outputs = {}

            def ours():
                outputs['ours'] = our_prediction(model, ep)[1]

            def theirs():
                if adapted:
                    out = reference.adapted(ep, *adaptation)
                else:
                    out = reference.vote(ep) if hasattr(reference, 'vote') else reference.probabilities(ep)
                outputs['reference'] = out[1] if isinstance(out, tuple) else out.argmax(1)

            times = interleaved({'ours': ours, 'reference': theirs}, device, args.time, 1)
            r = {name: statistics.median(t) for name, t in times.items()}
            r['ratio'] = r['ours'] / r['reference']
            r['mask_agreement'] = float((outputs['ours'] == outputs['reference']).float().mean())
            results[k, adapted] = r
            when = f', {adaptation[0]} adaptation step(s)' if adapted else ''
            print(f'{args.method} {k}-shot {args.size}x{args.size} float32{when}, {torch.get_num_threads()} '
                  f'thread(s), median of {args.time}: ours {r["ours"]:.3f} s, reference {r["reference"]:.3f} s: '
                  f'{r["ratio"]:.2f}x (same mask on {100 * r["mask_agreement"]:.2f}% of the pixels)', flush=True)
    model.set_test_time(finetune_steps=0)
    if args.train_bsz:
        results['train'] = time_training(args, model, reference)
    return results


def time_training(args, model, reference) -> dict:
    r"""`--time N --train-bsz B`: one training step (a batch of B one-shot episodes: forward, loss, backward, Adam
    step) of ours (`scripts/bench.py`'s, as train.py) and of the reference's train.py, alternately, N pairs."""
    from scripts.bench import interleaved, train_step
    from tests.golden.make import episode
    ep = episode(1, args.train_bsz, 0, args.size)
    optimizer = torch.optim.Adam([p for p in reference.model.parameters() if p.requires_grad], lr=1e-5)
    times = interleaved({'ours': train_step(model, ep, 'fp32', torch.device('cpu')),
                         'reference': lambda: reference.train_step(ep, optimizer)}, torch.device('cpu'), args.time, 1)
    r = {name: statistics.median(t) for name, t in times.items()}
    r['ratio'] = r['ours'] / r['reference']
    print(f'{args.method} training step, batch {args.train_bsz} 1-shot {args.size}x{args.size} float32, '
          f'{torch.get_num_threads()} thread(s), median of {args.time}: ours {r["ours"]:.3f} s, reference '
          f'{r["reference"]:.3f} s: {r["ratio"]:.2f}x', flush=True)
    return r


def _commit(folder: Path) -> str:
    import subprocess
    try:
        return subprocess.run(['git', '-C', str(folder), 'rev-parse', '--short', 'HEAD'], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown (not a git clone)'


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--method', required=True, choices=sorted(REFERENCES))
    p.add_argument('--reference-code', required=True, type=Path, help="a clone of the method's public repository")
    p.add_argument('--size', type=int, help='image side of the episodes (default 48; DMTNet 100, at least 97)')
    p.add_argument('--write-golden', action='store_true',
                   help='store the reference outputs in tests/golden/parity-<method>.pt')
    p.add_argument('--time', type=int, default=0, metavar='N',
                   help='instead of comparing in float64, time N interleaved pairs of float32 episodes (ours, the '
                        "reference's) at 1 and 5 shots; --size defaults to 400 here")
    p.add_argument('--threads', type=int, default=1, help='torch threads while timing (default 1)')
    p.add_argument('--train-bsz', type=int, default=0, metavar='B',
                   help="with --time: also time a training step on B one-shot episodes against the reference's "
                        'train.py (HSNet, PATNet, DMTNet)')
    args = p.parse_args(argv)
    adapter = REFERENCES[args.method]
    if args.time and args.size is None:
        args.size = max(TIME_SIZE, getattr(adapter, 'min_size', 1))
    if args.size is None:
        args.size = getattr(adapter, 'default_size', 48)
    if args.size < getattr(adapter, 'min_size', 1):
        raise UserError(f'--size {args.size}: the {args.method} reference needs at least {adapter.min_size} '
                        f'(see {adapter.__name__})')
    if args.time and args.write_golden:
        raise UserError('--time and --write-golden: time, or write the float64 reference outputs, not both')
    if args.time < 0 or args.threads < 1 or args.train_bsz < 0:
        raise UserError(f'--time {args.time}, --threads {args.threads}, --train-bsz {args.train_bsz}: the pairs and '
                        'the batch must be >= 0 and the threads >= 1')
    if args.train_bsz and not args.time:
        raise UserError('--train-bsz times a training step: give it with --time N')
    if args.train_bsz and not hasattr(adapter, 'train_step'):
        raise UserError(f'--train-bsz: the {args.method} reference has no training step here (HSNet, PATNet and '
                        'DMTNet have one)')
    model = our_model(args.method)
    reference = adapter(args.method, model, args.reference_code)
    if args.time:
        torch.set_num_threads(args.threads)
        return time_against_reference(args, model, reference)
    results = {}
    golden = {'method': args.method, 'size': args.size, 'reference': _commit(args.reference_code), 'cases': {},
              'episodes': 'half-planes' if args.method in HALF_PLANES else 'default'}
    adaptation = ADAPTATIONS.get(args.method)
    if adaptation:
        golden['adaptation'] = {'steps': adaptation[0], 'lr': adaptation[1], 'cases': {}}
    for k, ep in episodes(args.size, args.method).items():
        for adapted in (False, True) if adaptation else (False,):
            if adapted:
                model.set_test_time(*adaptation)
                ref_out = reference.adapted(ep, *adaptation)
            else:
                ref_out = reference.vote(ep) if hasattr(reference, 'vote') else reference.probabilities(ep)
            ours, our_mask = our_prediction(model, ep)
            model.set_test_time(finetune_steps=0)
            ref, ref_mask = ref_out if isinstance(ref_out, tuple) else (ref_out, None)
            results[k, adapted] = r = compare(ours, ref)
            case = {'seed': k, 'foreground': ref[:, 1].clone()}                 # background = 1 - it
            (golden['adaptation'] if adapted else golden)['cases'][k] = case
            what = 'probabilities'
            if ref_mask is not None:    # 'vote': foreground [B*K,H,W], one map per shot, and the voted mask
                what = f'per-shot probabilities ({k} forward{"s" if k > 1 else ""})'
                r['mask_agreement'] = float((our_mask == ref_mask).double().mean())
                case['mask'] = ref_mask.bool()                                  # [B,H,W], True = foreground
            when = ''
            if adapted:                 # how far the adaptation moved the reference: what the comparison can see
                moved = float((ref[:, 1] - golden['cases'][k]['foreground']).abs().max())
                when = f' after {adaptation[0]} adaptation step(s) at lr {adaptation[1]:g} (moved by {moved:.2e})'
            print(f'{args.method} {k}-shot {args.size}x{args.size} float64 vs {golden["reference"]}{when}: {what}: '
                  f'max |d| {r["max_abs"]:.2e}, relative {r["max_rel"]:.2e}, argmax agreement '
                  f'{r["argmax_agreement"]:.4f}'
                  + (f'; voted mask agreement {r["mask_agreement"]:.4f}' if ref_mask is not None else ''))
    if args.write_golden:
        path = GOLDEN / f'parity-{args.method}.pt'
        torch.save(golden, path)
        print(f'wrote {path}')
    return results


if __name__ == '__main__':
    run_cli(main)
