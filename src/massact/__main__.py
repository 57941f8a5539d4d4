import signal
import sys


def _interrupted(signum, frame):
    """Ctrl-C before the command line has set up its own handling (while it imports): one line, exit 130."""
    print("massact: interrupted", file=sys.stderr)
    raise SystemExit(130)


signal.signal(signal.SIGINT, _interrupted)

from .cli import main  # noqa: E402

raise SystemExit(main())
