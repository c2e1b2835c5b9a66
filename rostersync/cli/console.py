"""The console script `rostersync` and `python -m rostersync`: Ctrl-C at any instant of their
start-up ends the command as Ctrl-C just after it does, with one line and exit 1.

Importing the command's modules takes a good part of a second. Python's own handler raised
KeyboardInterrupt wherever the import was, and its traceback filled the terminal; a quiet
handler is set here first, before anything heavy is imported, until the command line's group
callback runs (:func:`started`). Click's handling and the commands' own take over from there,
and an error that a Ctrl-C in a command's own imports leads to ends quietly here too. Only
the console script sets the handler: a program that imports rostersync keeps its own. (The
interpreter's own start, before this module runs, is beyond any program's reach.)
"""

from __future__ import annotations

import os
import signal

TYPE_CHECKING = False  # typing itself is an import before the handler is set (3 ms)
if TYPE_CHECKING:
    from types import FrameType
    from typing import NoReturn

#: What the command says for a Ctrl-C before its own handling: on a terminal, on a line of
#: its own after the terminal's ``^C``; elsewhere (a log, the journal) no blank line before.
ABORTED = b"rostersync: aborted\n"


def _interrupted(signum: int, frame: FrameType | None) -> None:
    # Nothing is written or held yet: the process ends here, whatever was importing.
    try:  # noqa: SIM105 (contextlib: an import the handler is set after)
        os.write(2, b"\n" + ABORTED if os.isatty(2) else ABORTED)
    except OSError:  # no stderr to say it on
        pass
    os._exit(1)  # EXIT_FAILED, the status of any other Ctrl-C of the CLI


def console() -> NoReturn:
    """The entry point: the quiet handler, then the command line (rostersync.cli.main)."""
    signal.signal(signal.SIGINT, _interrupted)
    from rostersync.cli.main import console as command_line

    try:
        command_line()
    except BaseException as exc:
        # Ctrl-C in a command's own imports leaves a module half-imported: the next import
        # of it (click's "aborted" path imports the logging) failed with a NameError.
        if _after_ctrl_c(exc):
            _interrupted(signal.SIGINT, None)
        raise


def _after_ctrl_c(exc: BaseException | None) -> bool:
    """Whether ``exc`` was raised while a KeyboardInterrupt was being handled."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def started() -> None:
    """The command line has begun: Python's handler again (KeyboardInterrupt), which click
    and the commands handle. Only where the console script set the quiet one."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
