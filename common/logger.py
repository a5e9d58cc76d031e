r"""A run folder: resolved config (YAML), text log, tensorboardX scalars, checkpoints and results.json."""
import json
import logging
import os
import sys
import warnings
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

    def scalar(self, tag: str, value: float, step: int) -> None:
        if not self._tensorboard:
            return
        if self._writer is None:
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(str(self.dir / 'tb'))
        self._writer.add_scalar(tag, value, step)

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

    def write_json(self, name: str, data: dict):
        return None

    def close(self) -> None:
        pass
