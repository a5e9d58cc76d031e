r"""User-facing errors: a clear message instead of a traceback from deep inside a library."""
import sys
from typing import Callable


class UserError(Exception):
    r"""A problem the user can fix (missing file, wrong layout, bad flag). Printed without a traceback."""


def user_message(err: BaseException) -> str:
    r"""The message of a UserError, also when a DataLoader worker re-raised it with the worker's traceback."""
    msg = str(err)
    if 'Original Traceback' in msg:
        tail = msg.rstrip().splitlines()
        for i in range(len(tail) - 1, -1, -1):
            if tail[i].startswith(f'{type(err).__name__}: ') or tail[i].startswith('common.errors.UserError: '):
                return '\n'.join([tail[i].split(': ', 1)[1]] + tail[i + 1:])
    return msg


def run_cli(main: Callable[[], object]) -> None:
    r"""Run a command-line entry point; a `UserError` becomes `error: <message>` on stderr and exit code 2."""
    try:
        main()
    except UserError as err:
        print(f'error: {user_message(err)}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        sys.exit(130)
