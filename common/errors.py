r"""User-facing errors: a clear message instead of a traceback from deep inside a library."""
import errno
import os
import sys
import warnings
from typing import Callable


class UserError(Exception):
    r"""A problem the user can fix (missing file, wrong layout, bad flag). Printed without a traceback."""


class FlagError(UserError):
    r"""A `UserError` about the command line itself, so the same in every process of a distributed run: printed by
    rank 0 only."""


#: Operating-system errors about a path the user chose (too long, no space, no permission, ...): reported as
#: `error: <reason>: <path>` instead of a traceback when no earlier check caught them.
PATH_ERRNOS = {getattr(errno, name) for name in ('ENAMETOOLONG', 'ENOSPC', 'EACCES', 'EPERM', 'EROFS', 'ENOTDIR',
                                                 'EISDIR', 'EEXIST', 'ENOENT', 'EDQUOT') if hasattr(errno, name)}


def launcher_rank() -> int:
    r"""This process's rank as torchrun assigned it (0 outside torchrun), readable before the process group exists."""
    try:
        return int(os.environ.get('RANK', '0'))
    except ValueError:
        return 0


def user_message(err: BaseException) -> str:
    r"""The message of a UserError, also when a DataLoader worker re-raised it with the worker's traceback."""
    msg = str(err)
    if 'Original Traceback' in msg:
        tail = msg.rstrip().splitlines()
        for i in range(len(tail) - 1, -1, -1):
            if tail[i].startswith(f'{type(err).__name__}: ') or tail[i].startswith('common.errors.UserError: '):
                return '\n'.join([tail[i].split(': ', 1)[1]] + tail[i + 1:])
    return msg


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    r"""The project's warning format on stderr: `warning: <message>`, without the source line it came from."""
    print(f'warning: {message}', file=file or sys.stderr)


def run_cli(main: Callable[[], object]) -> None:
    r"""Run a command-line entry point: a `UserError` becomes `error: <message>` on stderr and exit code 2 (under
    torchrun a `FlagError` is printed by rank 0 only, the other ranks exit quietly), an operating-system error on a
    path the same without a traceback; warnings print as one `warning: ...` line."""
    shown, warnings.showwarning = warnings.showwarning, one_line_warning
    rank = launcher_rank()
    try:
        main()
    except UserError as err:
        if rank == 0 or not isinstance(err, FlagError):
            where = f' (rank {rank})' if rank else ''
            print(f'error{where}: {user_message(err)}', file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in PATH_ERRNOS:
            raise
        path = f': {err.filename}' if err.filename else ''
        print(f'error: {err.strerror or type(err).__name__}{path}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        sys.exit(130)
    finally:
        warnings.showwarning = shown
