r"""Print the registered method names (the keys of `METHODS` in model/__init__.py), space-separated.

Read from the source with `ast`, so the ablation scripts learn the method list without importing torch.
"""
import ast
from pathlib import Path

REGISTRY = Path(__file__).resolve().parents[2] / 'model' / '__init__.py'


def registered_methods(path: Path = REGISTRY) -> list[str]:
    r"""The string keys of the module-level `METHODS = {...}` dict literal, in order."""
    for node in ast.parse(path.read_text()).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == 'METHODS' and isinstance(node.value, ast.Dict):
            return [k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    raise SystemExit(f'error: no METHODS = {{...}} dict in {path}')


if __name__ == '__main__':
    print(' '.join(registered_methods()))
