import os
import signal
import sys


def _interrupted(signum, frame):
    """Ctrl-C before the command line has set up its own handling (while it imports): one line, exit 130. It exits
    at once rather than raising: the import may run under a compiled extension, where an exception aborts."""
    print("massact: interrupted", file=sys.stderr, flush=True)
    os._exit(130)


signal.signal(signal.SIGINT, _interrupted)

from .cli import run  # noqa: E402

run()
