r"""Method registry: name -> class. Adding a method = one file in model/ plus one line here (see docs/methods.md,
"Adding a method", and the toy prototype method of tests/test_methods.py)."""
import ast
import dataclasses
import importlib

from common.errors import UserError
from common.registry import LazyRegistry, module_source

METHODS = LazyRegistry({
    'hsnet': 'model.hsnet:HSNet',
    'patnet': 'model.patnet:PATNet',
    'pmms': 'model.pmms:PMMs',
    'rpmms': 'model.pmms:RPMMs',
    'qnet': 'model.qnet:QNet',
    'dmtnet': 'model.dmtnet:DMTNet',
    'ifa': 'model.ifa:IFA',
})

#: The backbones, declared here so that command lines need no torch import (model/backbone.py builds them): name ->
#: (torchvision constructor, its ImageNet weights enum or None (a weights file only), bottlenecks per layer1..4 of a
#: ResNet). '-deep': PSPNet's deep stem (IFA's ResNet).
BACKBONE_SPECS = {
    'resnet50': ('resnet50', 'ResNet50_Weights', (3, 4, 6, 3)),
    'resnet101': ('resnet101', 'ResNet101_Weights', (3, 4, 23, 3)),
    'vgg16': ('vgg16', 'VGG16_Weights', None),
    'resnet50-deep': ('resnet50', None, (3, 4, 6, 3)),
    'resnet101-deep': ('resnet101', None, (3, 4, 23, 3)),
}
BACKBONES = tuple(BACKBONE_SPECS)

# The interface, imported on first use (PEP 562): `from model import FewShotSegmenter` works as usual.
_EXPORTS = {'Backbone': 'model.backbone', 'BackboneSpec': 'model.backbone', 'Adaptation': 'model.records',
            'EpisodeContext': 'model.records', 'EpisodeRecord': 'model.records', 'FewShotSegmenter': 'model.base',
            'Hooks': 'model.base', 'Output': 'model.records', 'Recipe': 'model.records', 'SupportSet': 'model.records',
            'option': 'model.base'}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def method_class(name: str):
    if name not in METHODS:
        raise UserError(f'unknown method {name!r}; choose one of {", ".join(METHODS)}')
    return METHODS[name]


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    r"""One method option as train.py's flags need it (see `model.base.option`)."""
    name: str
    default: object
    help: str = ''
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None


def option_specs(name: str) -> list[OptionSpec]:
    r"""The options of method `name`. Read from the method's source file without importing it (so `train.py
    --method X -h` and flag errors need no torch) when they are declared with literal `option(...)` fields, as every
    method here does; otherwise from the imported class. tests/test_methods.py checks that both agree."""
    specs = _option_specs_from_source(name)
    if specs is None:
        specs = [OptionSpec(f.name, f.default, **{k: f.metadata.get(k) for k in ('help', 'choices', 'low', 'high')})
                 for f in dataclasses.fields(method_class(name).Options)]
    return specs


def _option_specs_from_source(name: str) -> list[OptionSpec] | None:
    target = dict.get(METHODS, name)
    if not isinstance(target, str):                      # unknown, already imported, or registered as a class
        return None
    module, cls_name = target.split(':')
    source = module_source(module)
    if source is None:
        return None
    constants, classes = source.constants, source.classes

    def value(node):
        if isinstance(node, ast.Name) and node.id in constants:
            return constants[node.id]
        return ast.literal_eval(node)                    # raises ValueError for anything else

    method = classes.get(cls_name)
    if method is None:
        return None
    options = [n.value.id for n in method.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Name)
               and any(isinstance(t, ast.Name) and t.id == 'Options' for t in n.targets)]
    if not options:                                      # inherits: FewShotSegmenter's NoOptions, else import
        bases = [b.id for b in method.bases if isinstance(b, ast.Name)]
        return [] if bases == ['FewShotSegmenter'] else None
    if options[0] not in classes:
        return None
    specs = []
    try:
        for field in classes[options[0]].body:
            if not isinstance(field, ast.AnnAssign) or not isinstance(field.target, ast.Name):
                continue
            call = field.value
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == 'option'):
                return None
            kwargs = {k.arg: value(k.value) for k in call.keywords}
            if call.args:
                kwargs['default'] = value(call.args[0])
            specs.append(OptionSpec(field.target.id, **kwargs))
    except (ValueError, TypeError, SyntaxError):
        return None
    return specs


def build_options(name: str, options: dict | None = None):
    r"""The options dataclass of method `name` from a dict (unknown keys are an error naming the valid ones)."""
    cls = method_class(name)
    options = dict(options or {})
    valid = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise UserError(f'{", ".join("--" + k.replace("_", "-") for k in unknown)}: not an option of method {name} '
                        f'(its options: {", ".join(sorted(valid)) or "none"})')
    return cls.Options(**options)


def build_method(name: str, backbone: str | None = None, backbone_weights: str | None = 'imagenet', **options):
    r"""Method `name` on its backbone. `backbone=None` takes the method's default; `backbone_weights=None` builds
    without initialising the backbone (a checkpoint supplies it); `options` are the method's own options."""
    from model.backbone import Backbone
    cls = method_class(name)
    opts = build_options(name, options)
    return cls(Backbone(backbone or cls.default_backbone, backbone_weights, cls.spec_for(opts)), opts)


def train_recipe(name: str, nshot: int = 1) -> dict:
    r"""The training defaults of method `name` (image size, batch, epochs, label-255 policy): train.py's
    `TRAIN_DEFAULTS` updated with the method's `train_recipe` (its public code's settings), whose 'kshot' entry
    applies for K > 1. Read from source (no torch import)."""
    from common.constants import TRAIN_DEFAULTS
    if name not in METHODS:
        raise UserError(f'unknown method {name!r}; choose one of {", ".join(METHODS)}')
    declared = dict(METHODS.declared(name, 'train_recipe', {}))
    kshot = declared.pop('kshot', {})
    return {**TRAIN_DEFAULTS, **declared, **(kshot if nshot > 1 else {})}


def stored_options(name: str, options: dict | None) -> dict:
    r"""The options of a saved run of method `name`: options it does not record take the method's `legacy_options`
    value (what the code did before the option existed), not today's default."""
    return {**method_class(name).legacy_options, **(options or {})}


__all__ = ['BACKBONES', 'METHODS', 'Adaptation', 'Backbone', 'BackboneSpec', 'EpisodeContext', 'EpisodeRecord',
           'FewShotSegmenter', 'Hooks', 'OptionSpec', 'Output', 'Recipe', 'SupportSet', 'build_method',
           'build_options', 'method_class', 'option', 'option_specs', 'stored_options', 'train_recipe']
