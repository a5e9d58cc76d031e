r"""A registry whose entries are imported on first use, so that `-h` and argument errors never import torch."""
import importlib


class LazyRegistry(dict):
    r"""name -> class, where a value may be given as 'module:Class' and is imported the first time it is looked up.
    Iterating over the names (`sorted(REGISTRY)`, `name in REGISTRY`) imports nothing."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if isinstance(value, str):
            module, name = value.split(':')
            value = getattr(importlib.import_module(module), name)
            super().__setitem__(key, value)
        return value

    def get(self, key, default=None):
        return self[key] if key in self else default

    def values(self):
        return [self[k] for k in self]

    def items(self):
        return [(k, self[k]) for k in self]
