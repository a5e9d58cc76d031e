r"""Checks on the folders a command writes, made before any work: the path can exist on this file system, and it
neither is, holds nor lies inside anything the command reads."""
import os
from pathlib import Path

from common.errors import UserError


def _limit(folder: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(folder, name)
    except (AttributeError, OSError, ValueError):          # no pathconf (Windows) or no such limit
        return default


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:                                     # e.g. a name too long to look up: it cannot exist
        return False


def nearest_existing(path: Path) -> Path:
    r"""`path` or its closest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not _exists(path) and path != path.parent:
        path = path.parent
    return path


def check_creatable_folder(path: str | Path, flag: str) -> None:
    r"""`path` can be a folder: no part of it is an existing file, no name is longer than the file system allows
    and the whole path fits its limit (else a `UserError` naming `flag` and the reason)."""
    path = Path(path)
    existing = nearest_existing(path)
    if _exists(existing) and not existing.is_dir():
        where = 'is a file' if existing == Path(os.path.abspath(path)) else f'lies under the file {existing}'
        raise UserError(f'{flag} {path} {where}, not a folder; choose a folder path')
    name_max = _limit(existing, 'PC_NAME_MAX', 255)
    for part in Path(os.path.abspath(path)).parts:
        if len(os.fsencode(part)) > name_max:
            raise UserError(f'{flag} {path}: the name {part[:40]}... has {len(os.fsencode(part))} bytes, more than '
                            f'the {name_max} this file system allows for one name; choose a shorter path')
    path_max = _limit(existing, 'PC_PATH_MAX', 4096)
    if len(os.fsencode(os.path.abspath(path))) + 64 > path_max:         # room for the files written inside
        raise UserError(f'{flag} {path}: the path has {len(os.fsencode(os.path.abspath(path)))} bytes, too close '
                        f'to the {path_max} this file system allows; choose a shorter path')


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_apart_from_inputs(out: str | Path, flag: str, inputs: list[tuple[str, str | Path]],
                            inside_ok: bool = False) -> None:
    r"""Refuse an output folder `out` that is, contains or lies inside any of `inputs` ((flag, path) pairs: the
    files and folders the command reads), before any work: writing (or `--overwrite`) there could destroy them.
    `inside_ok`: a folder inside an input folder is allowed (report.py's default, `GRID/report`: it only ever
    replaces its own files, `common.logger.staged_folder`)."""
    target = Path(os.path.realpath(out))
    for what, path in inputs:
        source = Path(os.path.realpath(path))
        if target == source:
            clash = 'is'
        elif _inside(source, target):
            clash = 'contains'
        elif source.is_dir() and _inside(target, source) and not inside_ok:
            clash = 'lies inside'
        else:
            continue
        raise UserError(f'{flag} {out} {clash} the input {what} {path}: outputs never go where inputs are read '
                        f'from (they could be overwritten or removed); choose a separate {flag} folder')
