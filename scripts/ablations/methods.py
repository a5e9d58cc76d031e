r"""Print the registered method names (model.METHODS, read without importing torch), space-separated;
`--alpha-hosts`: only those whose CD-TG fusion has an image weight alpha (prototype hosts; `plugin_point` read from
the sources, no import either).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model import METHODS  # noqa: E402


def registered_methods(alpha_hosts: bool = False) -> list[str]:
    if alpha_hosts:
        return [name for name in METHODS if METHODS.declared(name, 'plugin_point') == 'prototypes']
    return list(METHODS)


if __name__ == '__main__':
    print(' '.join(registered_methods('--alpha-hosts' in sys.argv[1:])))
