"""``emostream`` command line: replay, classify, batch, report and the live sources (serve, send, watch, mic).

A thin layer over the library: :mod:`.parser` turns arguments into options, :mod:`.files`,
:mod:`.batch` and :mod:`.live` run the commands, :mod:`.common` holds what they share. Bad input is one line on
stderr and exit code 2 (:class:`UsageError`).
"""

from __future__ import annotations

import sys

from .batch import cmd_batch, cmd_report
from .common import UsageError
from .files import cmd_classify, cmd_export, cmd_replay
from .live import cmd_mic, cmd_send, cmd_serve, cmd_watch
from .parser import build_parser

__all__ = ["UsageError", "build_parser", "main", "run"]


COMMANDS = {
    "replay": cmd_replay,
    "classify": cmd_classify,
    "export": cmd_export,
    "serve": cmd_serve,
    "send": cmd_send,
    "watch": cmd_watch,
    "mic": cmd_mic,
    "batch": cmd_batch,
    "report": cmd_report,
}


def _terminate_like_interrupt(signum, frame) -> None:
    """SIGTERM (a service manager, ``kill``) ends a command as Ctrl-C does: replay, mic, send, batch
    and serve still write the summary they promise."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``emostream`` console script."""
    import signal
    import threading

    from ..audio import AudioError
    from ..loading import ModelOptionsError
    from ..model_files import CheckpointError
    from ..vad import VadUnavailable

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate_like_interrupt)
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"emostream: error: {exc}", file=sys.stderr)
        return 2
    except (
        AudioError,
        CheckpointError,
        ModelOptionsError,
        VadUnavailable,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
    ) as exc:
        print(f"emostream: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emostream: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run() -> None:
    """The console script and ``python -m emostream``: :func:`main`, then the interpreter's own exit
    steps (atexit handlers, other threads, flushed output) and a plain process exit. Skipped: the
    module and shared-library teardown, which touched ~125 MB of torch's and its CUDA libraries'
    pages after a call was done, the top of a long call's peak memory (issue #42)."""
    import atexit
    import os
    import threading

    try:
        code = main()
    except SystemExit as exc:  # argparse: --help, usage errors
        code = exc.code
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    try:
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


if __name__ == "__main__":
    run()
