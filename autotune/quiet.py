"""Quiet, plain command-line tools: what every pallaskit entry point shares.

- `quiet_libtpu()`: no libtpu host-probing noise on a host without a TPU. Each tool calls it first,
  before JAX starts a backend (importing jax is fine: libtpu loads when the first backend or a
  compile-only topology starts).
- `ArgumentParser`: argparse whose usage errors are one line on stderr (`prog: error: message`,
  exit code 2, no traceback) and whose help shows every default.
- `Progress`: a tqdm bar on a terminal; plain lines (about one per 10 %), never `\\r` redraws, when
  stderr is a log file or a pipe.
- Argument types (`positive_int`, `existing_dir`, ...) that reject bad values at parse time.

Where the libtpu noise comes from: on a host without a TPU, jax sets TPU_SKIP_MDS_QUERY=1 (no GCE
metadata query) and libtpu, loaded when jax starts its backends (`jax.devices()`) or a compile-only
topology (`jax.experimental.topologies`), falls back to placeholder strings for the accelerator
type and the worker hostnames ("WARNING: could not determine TPU accelerator type ..."), then fails
to parse them: "Failed to find host bounds for accelerator type: WARNING: ...", "WARNING: Logging
before InitGoogle() ...", "E0000 ... common_lib.cc:860] INVALID_ARGUMENT: Error: unexpected worker
hostname ..." and a two-line source-location trace. These are printed before libtpu's logging
starts, so no log level (TPU_MIN_LOG_LEVEL, TPU_STDERR_LOG_LEVEL, TF_CPP_MIN_LOG_LEVEL) reaches
them. Telling libtpu what it failed to find does: one host (TPU_HOST_BOUNDS=1,1,1) named localhost
(TPU_WORKER_HOSTNAMES=localhost), the values of a single-host TPU VM. Compile-only results are
unchanged (the same compiled HLO for v4, v5e, v5p, v6e and tpu7x with and without them), and no log
level changes: every real libtpu error is still printed. Nothing is set where a TPU is attached or
where the user set any TPU topology variable.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import IO, Any, NoReturn

# PCI device ids of TPU chips (vendor 0x1ae0, Google): jax._src.hardware_utils._TPU_PCI_DEVICE_IDS,
# which decides whether jax skips the metadata query (tests check that this list covers jax's).
_GOOGLE_PCI_VENDOR_ID = "0x1ae0"
TPU_PCI_DEVICE_IDS = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076", "0x0083",
                                "0x007c"})
# Variables that describe a TPU slice to libtpu: if the user set any, the topology is theirs.
TPU_TOPOLOGY_ENV = ("TPU_ACCELERATOR_TYPE", "CLOUD_TPU_ACCELERATOR_TYPE", "TPU_HOST_BOUNDS", "TPU_WORKER_HOSTNAMES",
                    "TPU_WORKER_ID", "TPU_PROCESS_BOUNDS", "TPU_CHIPS_PER_PROCESS_BOUNDS", "TPU_PROCESS_ADDRESSES",
                    "TPU_TOPOLOGY", "TPU_TOPOLOGY_WRAP", "CLOUD_TPU_TASK_ID")
# What a single-host TPU VM's metadata says; what libtpu needs to start quietly without one.
SINGLE_HOST_ENV = {"TPU_HOST_BOUNDS": "1,1,1", "TPU_WORKER_HOSTNAMES": "localhost"}


def tpu_attached(sys_root: str = "/") -> bool:
    """Whether this host has a TPU: a TPU chip on the PCI bus, or a TPU device node.

    Args:
      sys_root: the file-system root to look under (tests).
    Returns:
      True when a TPU chip or a /dev/accel* or /dev/vfio/<n> device node is present (any doubt
      counts as a TPU: then nothing is changed).
    """
    root = Path(sys_root)
    for vendor in glob.glob(str(root / "sys/bus/pci/devices/*/vendor")):
        try:
            if Path(vendor).read_text().strip() != _GOOGLE_PCI_VENDOR_ID:
                continue
            if (Path(vendor).parent / "device").read_text().strip() in TPU_PCI_DEVICE_IDS:
                return True
        except OSError:
            continue
    return bool(glob.glob(str(root / "dev/accel[0-9]*")) or glob.glob(str(root / "dev/vfio/[0-9]*")))


def quiet_libtpu(environ: MutableMapping[str, str] | None = None, *, sys_root: str = "/") -> dict[str, str]:
    """Silence libtpu's host-probing messages on a host without a TPU (see the module docstring).

    Call it before JAX starts a backend. It sets only the two variables libtpu failed to find, only
    where no TPU is attached and no TPU topology variable is set; it changes no log level.

    Args:
      environ: the environment to change (default: os.environ, which the process's libtpu reads).
      sys_root: the file-system root to look for a TPU under (tests).
    Returns:
      The variables it set ({} when it changed nothing).
    """
    env = os.environ if environ is None else environ
    if any(name in env for name in TPU_TOPOLOGY_ENV) or tpu_attached(sys_root):
        return {}
    env.update(SINGLE_HOST_ENV)
    return dict(SINGLE_HOST_ENV)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after every option's help, except where there is no default to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose usage errors print one line, `prog: error: message`, and exit 2.

    Its sub-command parsers are of this class too; its help shows defaults (HelpFormatter).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print `prog: error: message` on one line to stderr and exit with code 2.

        Args:
          message: what was wrong (newlines are folded into spaces).
        """
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


def _number(convert: Callable[[str], float], ok: Callable[[float], bool], what: str) -> Callable[[str], Any]:
    """An argparse type: `convert(text)` when `ok` accepts it, else an error saying `what` was expected."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__doc__ = f"argparse type: {what}."
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a positive number")
port_number = _number(int, lambda v: 0 <= v <= 65535, "a port number 0..65535")


def _existing(check: Callable[[Path], bool], what: str) -> Callable[[str], str]:
    """An argparse type accepting a path that `check` accepts (returned as given)."""
    def parse(text: str) -> str:
        if not check(Path(text)):
            raise argparse.ArgumentTypeError(f"no such {what}: {text!r}")
        return text

    parse.__doc__ = f"argparse type: a path to an existing {what}."
    return parse


existing_file = _existing(Path.is_file, "file")
existing_dir = _existing(Path.is_dir, "directory")
existing_path = _existing(Path.exists, "file or directory")


def reader_gone() -> int:
    """After a BrokenPipeError on stdout (the reader left, as `| head` does): send the rest of the
    output to /dev/null, so that exiting does not print a traceback.

    Returns:
      The exit code to return (1).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


def run_command(func: Callable[[Any], int], args: Any) -> int:
    """Run a parsed sub-command with libtpu quiet; a reader that leaves early (`| head`) ends it quietly.

    Args:
      func: the sub-command, func(args) -> exit code.
      args: the parsed arguments.
    Returns:
      The exit code.
    """
    quiet_libtpu()
    try:
        return func(args)
    except BrokenPipeError:
        return reader_gone()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Progress of one loop: a tqdm bar on a terminal; plain lines when the stream is not a terminal.

    Plain lines ("desc: 30/300") come when the count passes each tenth of the total and at the end
    (every 100 items without a total); `lines=False` keeps a non-terminal stream silent (inner loops).
    Call it as `progress(done, total)` (the tuner's and the serving benchmark's callback signature);
    it closes itself when done reaches the total, or on close() / leaving a `with` block.
    """

    def __init__(self, desc: str, total: int | None = None, *, leave: bool = True, lines: bool = True,
                 stream: IO[str] | None = None) -> None:
        """Start the bar (terminal) or the line counter.

        Args:
          desc: what is counted, printed before the count.
          total: the number of items, when known (it may also come with each call).
          leave: keep the finished bar on the terminal.
          lines: print plain lines on a stream that is not a terminal.
          stream: where to write (default: sys.stderr).
        """
        self.stream = stream if stream is not None else sys.stderr
        self.desc, self.total, self.lines = desc, total, lines
        self.done = 0
        self._printed = -1  # the tenth (or hundred) last reported in plain lines
        self._closed = False
        self._bar = None
        if _isatty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=self.stream, leave=leave, dynamic_ncols=True)

    def __call__(self, done: int, total: int | None = None) -> None:
        """Report `done` items of `total` (default: the total given before).

        Args:
          done: items finished so far.
          total: the number of items, if it changed or was not known.
        """
        if self._closed:
            return
        if total is not None and total != self.total:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
        if self._bar is not None:
            self._bar.update(max(done - self._bar.n, 0))
        elif self.lines:
            self._line(done)
        self.done = done
        if self.total is not None and done >= self.total:
            self.close()

    def _line(self, done: int) -> None:
        step = done * 10 // self.total if self.total else done // 100
        finished = self.total is not None and done >= self.total
        if step > self._printed or finished:
            self._printed = step
            tail = f"/{self.total}" if self.total is not None else ""
            self.stream.write(f"{self.desc}: {done}{tail}\n")
            self.stream.flush()

    def write(self, message: str) -> None:
        """Print a message line without breaking the bar.

        Args:
          message: the line to print.
        """
        if self._bar is not None and not self._closed:
            self._bar.write(message, file=self.stream)
        else:
            self.stream.write(message + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Finish the bar (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generation_type(choices: tuple[str, ...], extra: tuple[str, ...] = ()) -> Callable[[str], str]:
    """argparse type: a generation among `choices` (any spelling parse_generation knows), or an `extra` word.

    Args:
      choices: the generations accepted.
      extra: literal values also accepted ("all").
    Returns:
      The type function; it returns the generation key (or the extra word).
    """

    from autotune.hardware import UnknownChipError, parse_generation

    def parse(text: str) -> str:
        if text in extra:
            return text
        try:
            gen = parse_generation(text)
        except UnknownChipError:
            gen = None
        if gen not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(choices + extra)})")
        return gen

    return parse
