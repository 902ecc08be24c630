"""``python -m lowbit``: run the command line and exit with its status.

An interrupted run (status 130) leaves through ``os._exit`` once stdout and stderr are flushed. CPython
(3.11 at least) marks the interpreter as ended by an uncaught Ctrl-C whenever a KeyboardInterrupt
passes through ``exec`` of a string, even when lowbit catches it afterwards; ``dataclasses`` and
``namedtuple`` run one such ``exec`` per class, so a Ctrl-C during any import can set the mark, and
``python -m`` then kills itself with SIGINT on the way out instead of exiting 130. By the time ``main``
returns, the command's outputs are removed and its locks released (``lowbit.io.output``), so the
interpreter's own shutdown has nothing of lowbit's left to do.
"""

import os
import sys

from lowbit.boundary import EXIT_INTERRUPTED
from lowbit.cli import main

status = main()
if status == EXIT_INTERRUPTED:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
raise SystemExit(status)
