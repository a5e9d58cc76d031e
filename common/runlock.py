r"""One run per folder: an exclusive OS-level lock on a run or output folder, held for the life of the process.

The lock is `flock` (POSIX; `msvcrt.locking` on Windows) on the file `<folder>/.lock`, which also records who holds
it (PID, host, command, start time). The operating system drops the lock when the process ends, however it ends
(`kill -9` included), so there is never a stale lock to clean up: the file stays, the lock does not.
"""
import json
import os
import socket
import sys
import time
from pathlib import Path

from common.errors import UserError

LOCK_FILE = '.lock'

if sys.platform == 'win32':                                          # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


class RunLock:
    r"""Lock `folder` (which must exist) for `command`; a folder locked by a live process is a `UserError` naming the
    holder. `release()` (or the end of the process) frees it."""

    def __init__(self, folder: str | Path, command: str, flag: str = '--logpath'):
        self.path = Path(folder) / LOCK_FILE
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f'cannot create the lock file {self.path} ({err.strerror or type(err).__name__}); '
                            f'choose a writable folder with {flag}') from err
        if not _try_lock(self.fd):
            holder = self.holder()
            os.close(self.fd)
            self.fd = None
            raise UserError(f'{flag} {folder} is in use by another run ({holder}); wait for it to end or choose '
                            f'another folder with {flag}')
        record = {'pid': os.getpid(), 'host': socket.gethostname(), 'command': command,
                  'started': time.strftime('%Y-%m-%d %H:%M:%S')}
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, (json.dumps(record) + '\n').encode())

    def holder(self) -> str:
        r"""Who holds the lock, as the holder wrote it ('another process' while it has not written yet)."""
        try:
            record = json.loads(self.path.read_text() or '{}')
        except (OSError, ValueError):
            record = {}
        if not record:
            return 'another process'
        return (f'{record.get("command", "a run")}, PID {record.get("pid", "?")} on {record.get("host", "?")}, '
                f'started {record.get("started", "?")}')

    def release(self) -> None:
        if self.fd is not None:
            _unlock(self.fd)
            os.close(self.fd)
            self.fd = None


def check_free(folder: str | Path, flag: str = '--logpath') -> None:
    r"""Refuse now, with the holder named, when a live run holds `folder` (before slower checks would report a
    symptom of that run, such as its checkpoints); a folder without a lock file is free."""
    if (Path(folder) / LOCK_FILE).is_file():
        RunLock(folder, 'probe', flag).release()
