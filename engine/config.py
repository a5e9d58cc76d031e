r"""The typed configuration of a training run: built once from train.py's flags (or from a checkpoint, to resume or
evaluate it), validated once, saved once.

    TrainConfig                 the run: schedule, logging, runtime, and its two sections
      .data: DataConfig         benchmark, validation benchmark, data folder, shots, image size, benchmark options
      .model: ModelConfig       method, backbone, the method's options, the plug-ins' settings

A checkpoint stores `to_dict(checkpoint=True)`: the run's flat keys as train.py's flags name them (the same keys as
before this module existed), with each plug-in's settings stored once, in the checkpoint's plug-in record
(`ckpt['plugin']['config']`); config.yaml in the run folder holds `to_dict()`, whose plug-in section is the settings
themselves. Runs saved before a key existed read it with the value the code had then (`LEGACY`).
"""
import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

from common.errors import UserError
from data import dataset_options
from engine.flags import plugin_specs
from model import build_options, method_class, stored_options

#: The value of a run key in configurations saved before it existed (what the code did then).
LEGACY = {'augmentation': 'none', 'train_boundary': 'ignore', 'lr_schedule': 'method', 'warmup_steps': 0,
          'grad_clip': None, 'precision': 'fp32', 'compile': False, 'recipe_from_method': [], 'val_benchmark': None,
          'bn_calibration': 0, 'backbone_weights': 'imagenet', 'config': None}


@dataclass
class ModelConfig:
    r"""What builds the model: the method, its backbone, its options, and the settings of each attached plug-in."""
    method: str
    backbone: str
    method_options: dict = field(default_factory=dict)
    plugins: dict = field(default_factory=dict)       # plug-in name -> its settings dataclass

    @classmethod
    def from_saved(cls, config: Mapping, records: Mapping | None = None, saved: bool = True) -> 'ModelConfig':
        r"""The model of a saved run configuration; `records` is the checkpoint's plug-in record (its settings).
        Options a run does not record take the method's legacy value (`saved`; otherwise, for a configuration written
        by hand, their default)."""
        method = config.get('method')
        if method is None:
            raise UserError('the run configuration names no method; it was not written by train.py')
        method_class(method)                                    # a clear error for an unknown method
        plugins = {}
        for spec in plugin_specs():
            record = (records or {}).get('config') if (records or {}).get('name') == spec.name else None
            settings = spec.from_saved(config, record)
            if settings is not None:
                plugins[spec.name] = settings
        options = stored_options(method, config.get('method_options')) if saved else \
            method_options(method, dict(config.get('method_options') or {}))
        return cls(method, config.get('backbone') or method_class(method).default_backbone, options, plugins)

    def plugin(self, name: str):
        return self.plugins.get(name)


@dataclass
class DataConfig:
    r"""The source data of a run: training benchmark, model-selection benchmark (None: the training benchmark's val
    split), data folder, shots, image size and the benchmark's own options."""
    benchmark: str
    datapath: str
    nshot: int
    img_size: int
    val_benchmark: str | None = None
    options: dict = field(default_factory=dict)

    @property
    def validation(self) -> str:
        return self.val_benchmark or self.benchmark

    @property
    def validation_options(self) -> dict:
        return self.options if self.validation == self.benchmark else {}


@dataclass
class TrainConfig:
    r"""A training run (see the module docstring). The fields are train.py's flags, resolved: the method's recipe
    fills the ones the user left unset (`recipe_from_method` names them)."""
    data: DataConfig
    model: ModelConfig
    logpath: str
    backbone_weights: str
    bn_calibration: int
    bsz: int
    epochs: int
    seed: int
    lr: float | None
    episodes_per_epoch: int | None
    val_episodes: int
    # runtime flags a resumed run may change; None in a configuration saved before the flag existed (a resumed run
    # takes train.py's default)
    workers: int | None = None
    device: str | None = None
    log_every: int | None = None
    save_every_steps: int | None = None
    tb_images: int | None = None
    skip_nonfinite: int | None = None
    augmentation: str = LEGACY['augmentation']
    train_boundary: str = LEGACY['train_boundary']
    lr_schedule: str = LEGACY['lr_schedule']
    warmup_steps: int = LEGACY['warmup_steps']
    grad_clip: float | None = LEGACY['grad_clip']
    precision: str = LEGACY['precision']
    compile: bool = LEGACY['compile']
    recipe_from_method: list = field(default_factory=list)
    config: str | None = None                         # the --config YAML the flags came from

    # --- building -------------------------------------------------------------------------------------------------
    @classmethod
    def from_args(cls, args: argparse.Namespace, recipe: dict, logpath: str) -> 'TrainConfig':
        r"""A new run from train.py's flags; `recipe` holds the method's defaults for the flags left unset."""
        values = vars(args)
        method = method_class(args.method)
        option_names = [f.name for f in dataclasses.fields(method.Options)]
        options = method_options(args.method, {k: values[k] for k in option_names})
        plugins = {spec.name: s for spec in plugin_specs() if (s := spec.from_flags(values, args.seed)) is not None}
        model = ModelConfig(args.method, args.backbone or method.default_backbone, options, plugins)
        flat = dict(values, logpath=logpath)
        unset = sorted(k for k in recipe if flat.get(k) is None)
        flat.update({k: recipe[k] for k in unset})
        return cls._from_flat(flat, model, recipe_from_method=unset)

    @classmethod
    def from_saved(cls, config: Mapping, records: Mapping | None = None, defaults: Mapping | None = None,
                   strict: bool = False) -> 'TrainConfig':
        r"""A saved run (checkpoint['config'], with checkpoint['plugin'] as `records`). Keys it does not hold take
        `defaults` (e.g. the parser's, for flags a resumed run may set), else their `LEGACY` value; `strict` (to
        resume it) refuses a configuration that lacks a key train.py always writes, otherwise (to evaluate it) such a
        key reads None."""
        flat = {**LEGACY, **(defaults or {}), **config}
        return cls._from_flat(flat, ModelConfig.from_saved(config, records),
                              recipe_from_method=list(flat['recipe_from_method']), strict=strict)

    @classmethod
    def _from_flat(cls, flat: Mapping, model: ModelConfig, recipe_from_method: list,
                   strict: bool = True) -> 'TrainConfig':
        data = DataConfig(flat.get('benchmark'), flat.get('datapath'), flat.get('nshot'), flat.get('img_size'),
                          flat.get('val_benchmark'), dataset_options(argparse.Namespace(**flat)))
        names = {f.name for f in dataclasses.fields(cls)} - {'data', 'model', 'recipe_from_method'}
        missing = sorted(n for n in names if n not in flat and _required(cls, n))
        if missing and strict:
            raise UserError(f'the saved run configuration lacks {", ".join(missing)}; it was not written by train.py')
        return cls(data=data, model=model, recipe_from_method=recipe_from_method,
                   **{n: flat.get(n) for n in names if n in flat or n in missing})

    # --- saving ---------------------------------------------------------------------------------------------------
    def to_dict(self, checkpoint: bool = False) -> dict:
        r"""The flat configuration train.py's flags name. `checkpoint`: each plug-in is recorded as enabled (its
        settings go into the checkpoint's plug-in record); otherwise (config.yaml) its settings are its section."""
        out = {'config': self.config, 'method': self.model.method, 'benchmark': self.data.benchmark,
               'val_benchmark': self.data.val_benchmark, 'datapath': self.data.datapath, **self.data.options,
               'backbone': self.model.backbone}
        run = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ('data', 'model', 'config', 'recipe_from_method')}
        out.update(run, nshot=self.data.nshot, img_size=self.data.img_size)
        for name, settings in self.model.plugins.items():
            out[name] = True if checkpoint else settings.to_dict()
        out['recipe_from_method'] = list(self.recipe_from_method)
        out['method_options'] = dict(self.model.method_options)
        return out

    def hparams(self) -> dict:
        r"""The settings that tell runs apart, flat, for TensorBoard's HParams tab."""
        out = {'method': self.model.method, 'benchmark': self.data.benchmark, 'backbone': self.model.backbone,
               'backbone_weights': self.backbone_weights, 'bn_calibration': self.bn_calibration,
               'img_size': self.data.img_size, 'bsz': self.bsz, 'epochs': self.epochs,
               'episodes_per_epoch': self.episodes_per_epoch, 'nshot': self.data.nshot, 'seed': self.seed}
        out.update({f'option/{k}': v for k, v in self.model.method_options.items()})
        for spec in plugin_specs():
            settings = self.model.plugin(spec.name)
            out[spec.name] = settings is not None
            if settings is not None:
                out.update({f'{spec.name}/{k}': v for k, v in settings.to_dict().items()
                            if k not in ('text_cache', 'seed')})
        return out


def method_options(method: str, values: dict) -> dict:
    r"""The full, validated options of `method` (defaults where a value is None) as a plain dict."""
    given = {k: v for k, v in values.items() if v is not None}
    return dataclasses.asdict(build_options(method, given))


def _required(cls, name: str) -> bool:
    f = cls.__dataclass_fields__[name]
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
