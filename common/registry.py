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


def _declared(target: str, attr: str, seen: set) -> tuple[bool, object] | None:
    r"""(True, value) if declared, (False, None) if no class of the chain declares it, None if unreadable."""
    import ast
    import importlib.util
    module, name = target.split(':')
    if target in seen:
        return False, None
    seen.add(target)
    top = module.split('.')[0]
    if top not in _PROJECT_PACKAGES:
        return False, None                                      # outside the project: taken not to declare it
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith('.py'):
        return None
    tree = ast.parse(open(spec.origin, encoding='utf-8').read())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    imported = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                imported[alias.asname or alias.name] = f'{node.module}:{alias.name}'
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
