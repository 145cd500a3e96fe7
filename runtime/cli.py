"""What the command-line tools share: one line and exit status 2 for a usage error
(`cli_errors`) or for storage that fails while a tool runs (`storage_errors`), and one
line with the shell's exit code when Ctrl-C or SIGTERM ends a tool (`interruptible`)."""
from __future__ import annotations

import contextlib
import errno
import signal
import sys
import threading
from typing import Callable, Iterator

# what a tool reports as a usage error while it starts: a bad setting, or a file that is
# missing, unreadable or cannot be written (OSError covers a read-only place, a missing
# directory); `cli_errors` wraps only the start (settings, files, loading), so a bug
# further on still shows its traceback
USAGE_ERRORS = (ValueError, OSError)

# what the machine can do to a running tool's output: a full disk or quota, a place made
# read-only or forbidden (`storage_errors`)
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def usage_exit(prog: str, message: object) -> SystemExit:
    """`PROG: error: MESSAGE` on stderr; the exit (status 2) for the caller to raise."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return SystemExit(2)


@contextlib.contextmanager
def cli_errors(prog: str) -> Iterator[None]:
    """Report a usage error raised inside as `PROG: error: MESSAGE` on stderr and exit 2."""
    try:
        yield
    except USAGE_ERRORS as err:
        raise usage_exit(prog, err) from None


@contextlib.contextmanager
def storage_errors(prog: str) -> Iterator[None]:
    """An OSError of the storage (STORAGE_ERRNOS: the disk filled, the place became
    read-only) raised inside, once a tool runs: one line, `PROG: error: MESSAGE`, exit 2.
    Any other error keeps its traceback."""
    try:
        yield
    except OSError as err:
        if err.errno not in STORAGE_ERRNOS:
            raise
        raise usage_exit(prog, err) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the program is, as Ctrl-C raises KeyboardInterrupt."""


@contextlib.contextmanager
def interruptible(prog: str, note: Callable[[], str] = lambda: "") -> Iterator[None]:
    """Ctrl-C or SIGTERM inside ends the program with one line, `PROG: interrupted` (and
    what `note()` says then, such as where what was done is), and the shell's exit code
    for the signal (130, 143), not a traceback. Cleanup in `finally` blocks on the way
    runs as usual."""
    def terminate(signum, frame):
        raise Terminated()

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if main else None
    try:
        yield
    except KeyboardInterrupt as err:
        print(f"{prog}: interrupted{note()}", file=sys.stderr, flush=True)
        raise SystemExit(128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)) from None
    finally:
        if main and previous is not None:  # None: a handler from outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)
