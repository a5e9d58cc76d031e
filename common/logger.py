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


def prepare_run_folder(logpath: str | Path) -> Path:
    r"""Create the run folder up front (before any data or model is built) and check that it is writable; a
    `UserError` says why not and suggests `--logpath`."""
    folder = Path(logpath)
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


@contextmanager
def staged_folder(final: str | Path, flag: str = '--out'):
    r"""Write a folder all at once: yields an empty temporary sibling of `final`; when the block ends without error
    it replaces `final` (a previous `final` is removed only after the new one is in place), and on any error it is
    deleted, so `final` is never half-written. An unwritable place is a `UserError` naming `flag`."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise UserError(f'{flag} {final} is a file; pass a folder')
    tmp = final.parent / f'.{final.name}.tmp-{os.getpid()}'
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as err:
        raise UserError(f'cannot write {flag} {final} ({err.strerror or type(err).__name__}); choose a writable '
                        'folder') from err
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.parent / f'.{final.name}.old-{os.getpid()}'
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class RunLogger:
    r"""Owns one run folder. Each instance has its own `logging.Logger`, so several runs can live in one process.

    While it is open, Python warnings are written to the log (terminal and log.txt) as one line `warning: ...`
    without the source line they were raised from; `close()` restores the previous warning display.
    """

    def __init__(self, logpath: str | Path, config: dict | None = None, tensorboard: bool = True, quiet: bool = False):
        self.dir = prepare_run_folder(logpath)
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
