r"""CD-TG text side: class descriptions (Text Generation Unit), CLIP text encoding and the semantic-guided plug-in.

`from text import CDTG` imports the plug-in (and torch) on first use; text.settings (its settings and command-line
flags) needs neither."""
import importlib

_EXPORTS = {'CDTG': 'text.plugin', 'CDTGConfig': 'text.settings'}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = ['CDTG', 'CDTGConfig']
