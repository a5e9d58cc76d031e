r"""A run folder: resolved config (YAML), text log, tensorboardX scalars, checkpoints and results.json."""
import json
import logging
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from common.config import dump_config
from common.errors import UserError
from common.paths import check_creatable_folder
from common.runlock import LOCK_FILE, RunLock


def prepare_run_folder(logpath: str | Path) -> Path:
    r"""Create the run folder up front (before any data or model is built) and check that it is writable; a
    `UserError` says why not and suggests `--logpath`."""
    folder = Path(logpath)
    check_creatable_folder(folder, '--logpath')
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f'.write-test-{os.getpid()}'
        probe.write_text('')
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(f'cannot write the run folder {folder} ({reason}); choose a writable folder with '
                        '--logpath DIR') from err
    return folder


#: The manifest an output folder's writer leaves in it: the command and the files it wrote, so that a later run of
#: the same command replaces exactly those (`staged_folder`).
MANIFEST = '.written-by.json'


@contextmanager
def staged_folder(final: str | Path, flag: str = '--out', command: str = '', replace: bool = False):
    r"""Write an output folder all at once and never touch what others put there.

    `final` is created if needed and locked for this process (`RunLock`); the block writes into an empty staging
    folder inside it. When the block ends without error, the files the previous run of `command` wrote (listed in
    its manifest, `MANIFEST`) are removed, the new files moved in and a new manifest written; on any error the
    staging folder is deleted and `final` keeps what it had. A non-empty `final` is refused up front unless `replace`
    is set and it holds a manifest of `command`; files listed nowhere are never removed, and a new file that would
    replace one of them is refused. An unwritable or impossible place is a `UserError` naming `flag`."""
    final = Path(final)
    check_creatable_folder(final, flag)
    created = not final.exists()
    try:
        final.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unwritable(flag, final, err) from err
    _previous_outputs(final, flag, command, replace)     # a foreign folder is refused before we add anything
    lock_created = not (final / LOCK_FILE).exists()
    lock = RunLock(final, command, flag)
    done = False
    try:
        for stale in final.glob('.staging-*'):                      # left by a killed run (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        previous = _previous_outputs(final, flag, command, replace)
        tmp = final / f'.staging-{os.getpid()}'
        try:
            tmp.mkdir()
        except OSError as err:
            raise _unwritable(flag, final, err) from err
        try:
            yield tmp
            written = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob('*') if p.is_file())
            foreign = [r for r in written if (final / r).exists() and r not in previous]
            if foreign:
                raise UserError(f'{flag} {final} already holds {", ".join(foreign[:3])} (not written by an earlier '
                                f'{command or "run"}); nothing was replaced: move those files or choose another '
                                f'{flag}')
            for rel in previous:
                _remove_file(final, rel)
            for rel in written:
                (final / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / rel, final / rel)
            (final / MANIFEST).write_text(json.dumps({'command': command, 'files': written}, indent=1) + '\n')
            done = True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.release()
        if lock_created and not done:               # a failed run leaves the folder as it found it
            (final / LOCK_FILE).unlink(missing_ok=True)
        if created and not done:
            try:
                final.rmdir()
            except OSError:
                pass


def _unwritable(flag: str, folder: Path, err: OSError) -> UserError:
    return UserError(f'cannot write {flag} {folder} ({err.strerror or type(err).__name__}); choose a writable folder')


def _previous_outputs(final: Path, flag: str, command: str, replace: bool) -> list[str]:
    r"""The files of `final` that a previous run of `command` wrote (to be replaced), or a `UserError` when `final`
    holds anything else and may not be written into."""
    entries = [p for p in final.iterdir() if p.name not in (LOCK_FILE, MANIFEST) and not p.name.startswith('.staging-')]
    manifest = final / MANIFEST
    if not entries and not manifest.exists():
        return []
    if not replace:
        raise UserError(f'{flag} {final} exists and is not empty; choose another folder, or pass --overwrite to '
                        f'replace the outputs of an earlier {command or "run"} there')
    try:
        record = json.loads(manifest.read_text())
        files = [str(f) for f in record['files']]
        ours = record.get('command') == command
    except (OSError, ValueError, KeyError, TypeError):
        ours, files = False, []
    if not ours:
        raise UserError(f'{flag} {final} holds files that {command or "this command"} did not write (no '
                        f'{MANIFEST} of it there), so it will not write into it; choose another folder or empty it '
                        'yourself')
    return [f for f in files if _within(final, f)]


def _within(folder: Path, rel: str) -> bool:
    path = Path(os.path.normpath(folder / rel))
    return folder.resolve() in path.resolve().parents


def _remove_file(folder: Path, rel: str) -> None:
    r"""Remove folder/rel and the folders it leaves empty (up to `folder`)."""
    path = folder / rel
    try:
        path.unlink()
    except FileNotFoundError:
        return
    parent = path.parent
    while parent != folder and folder in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent


class RunLogger:
    r"""Owns one run folder. Each instance has its own `logging.Logger`, so several runs can live in one process.

    The folder is locked for this run (`common.runlock.RunLock`, before anything is written into it): a second run
    on it stops at once with the holder's PID and host. While it is open, Python warnings are written to the log
    (terminal and log.txt) as one line `warning: ...` without the source line they were raised from; `close()`
    restores the previous warning display and frees the folder.
    """

    def __init__(self, logpath: str | Path, config: dict | None = None, tensorboard: bool = True, quiet: bool = False):
        self.dir = prepare_run_folder(logpath)
        self._lock = RunLock(self.dir, ' '.join([Path(sys.argv[0]).name] + sys.argv[1:])[:300])
        if config is not None:
            dump_config(config, self.dir / 'config.yaml')
        self.log = logging.getLogger(f'cdtg.run.{self.dir.resolve()}')
        self.log.setLevel(logging.INFO)
        self.log.propagate = False
        for handler in list(self.log.handlers):
            self.log.removeHandler(handler)
            handler.close()
        file_handler = logging.FileHandler(self.dir / 'log.txt')
        file_handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%Y-%m-%d %H:%M:%S'))
        self.log.addHandler(file_handler)
        if not quiet:
            console = logging.StreamHandler(sys.stdout)
            console.setFormatter(logging.Formatter('%(message)s'))
            self.log.addHandler(console)
        self._writer = None
        self._tensorboard = tensorboard
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._warning

    def _warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        self.log.warning(f'warning: {message}')

    def info(self, msg: str) -> None:
        self.log.info(msg)

    def writer(self):
        r"""The run's tensorboardX writer (created on first use; None when TensorBoard is off)."""
        if not self._tensorboard:
            return None
        if self._writer is None:
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(str(self.dir / 'tb'))
        return self._writer

    def scalar(self, tag: str, value: float, step: int) -> None:
        writer = self.writer()
        if writer is not None:
            writer.add_scalar(tag, value, step)

    def image(self, tag: str, image, step: int) -> None:
        r"""An RGB uint8 image [H,W,3] (numpy) on TensorBoard's Images tab; `image` may be a function returning it,
        called only when TensorBoard is on (drawing a figure costs more than the rest of a tiny epoch)."""
        writer = self.writer()
        if writer is not None:
            writer.add_image(tag, image() if callable(image) else image, step, dataformats='HWC')

    def hparams(self, hparams: dict, metrics: dict) -> None:
        r"""One entry of TensorBoard's HParams tab: the run's settings (numbers, strings, booleans; None is written
        as 'default') and its final metrics (tags must differ from the scalar tags)."""
        writer = self.writer()
        if writer is not None:
            clean = {k: ('default' if v is None else v) for k, v in hparams.items()}
            writer.add_hparams(clean, metrics, name='hparams')

    def write_json(self, name: str, data: dict) -> Path:
        path = self.dir / name
        tmp = path.with_suffix(path.suffix + '.tmp')
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
        return path

    def close(self) -> None:
        self._lock.release()
        if warnings.showwarning == self._warning:
            warnings.showwarning = self._showwarning
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for handler in list(self.log.handlers):
            self.log.removeHandler(handler)
            handler.close()


class NullLogger:
    r"""The logger of the non-main processes of a distributed run: rank 0 alone writes logs, TensorBoard and files."""

    def info(self, msg: str) -> None:
        pass

    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def image(self, tag: str, image, step: int) -> None:
        pass

    def hparams(self, hparams: dict, metrics: dict) -> None:
        pass

    def write_json(self, name: str, data: dict):
        return None

    def close(self) -> None:
        pass
