r"""A registry whose entries are imported on first use, so that `-h` and argument errors never import torch."""
import importlib
from dataclasses import dataclass


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

    def declared(self, key, attr: str, default=None):
        r"""Class attribute `attr` of entry `key`, read from source when the class is not imported yet (see
        `declared_attribute`): e.g. a method's plugin_point or a benchmark's protocols, for dry runs without torch."""
        value = super().__getitem__(key)
        if isinstance(value, str):
            return declared_attribute(value, attr, default)
        return getattr(value, attr, default)


_MISSING = object()


def declared_attribute(target: str, attr: str, default=_MISSING):
    r"""The value of class attribute `attr` of `target` ('module:Class'), read from the project's source files
    without importing them (so command lines and dry runs need no torch): a literal assigned in the class body, else
    in its bases, followed through the module's own classes and `from X import Base` lines. A base outside the
    project (e.g. torch's Dataset) is taken not to declare it. Falls back to importing the class when the value is
    not a literal (or the source cannot be read); `default` when no class declares it."""
    try:
        found = _declared(target, attr, set())
    except (OSError, SyntaxError, ValueError, ImportError):
        found = None
    if found is None:                                          # not readable from source: import
        module, name = target.split(':')
        value = getattr(getattr(importlib.import_module(module), name), attr, default)
    else:
        value = found[1] if found[0] else default
    if value is _MISSING:
        raise AttributeError(f'{target} declares no {attr!r}')
    return value


@dataclass
class ModuleSource:
    r"""The top level of a module's source: its classes (AST nodes), its literal constants and its `from X import
    Y` names ('X:Y')."""
    classes: dict
    constants: dict
    imports: dict


def module_source(module: str) -> ModuleSource | None:
    r"""Parse `module`'s source file without importing it (its parent packages are imported to find it); None when
    it has no .py source."""
    import ast
    import importlib.util
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith('.py'):
        return None
    source = ModuleSource({}, {}, {})
    for node in ast.parse(open(spec.origin, encoding='utf-8').read()).body:
        if isinstance(node, ast.ClassDef):
            source.classes[node.name] = node
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                source.constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                source.imports[alias.asname or alias.name] = f'{node.module}:{alias.name}'
    return source


def _declared(target: str, attr: str, seen: set) -> tuple[bool, object] | None:
    r"""(True, value) if declared, (False, None) if no class of the chain declares it, None if unreadable."""
    import ast
    module, name = target.split(':')
    if target in seen:
        return False, None
    seen.add(target)
    if module.split('.')[0] not in _PROJECT_PACKAGES:
        return False, None                                      # outside the project: taken not to declare it
    source = module_source(module)
    if source is None:
        return None
    classes, imported = source.classes, source.imports
    cls = classes.get(name)
    if cls is None:
        return None
    for node in cls.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attr for t in node.targets):
            return True, ast.literal_eval(node.value)          # ValueError (-> import) when not a literal
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == attr \
                and node.value is not None:
            return True, ast.literal_eval(node.value)
    for base in cls.bases:
        if not isinstance(base, ast.Name):
            return None
        where = f'{module}:{base.id}' if base.id in classes else imported.get(base.id)
        if where is None:
            return None
        found = _declared(where, attr, seen)
        if found is None or found[0]:
            return found
    return False, None


#: Top-level packages whose sources `declared_attribute` reads.
_PROJECT_PACKAGES = ('common', 'data', 'engine', 'model', 'text')
