"""Imported first by each script when it runs (not when another program imports it), before torch and transformers
load (seconds on a busy machine): Ctrl-C meanwhile ends the script with one line, as it does later
(`errors.run_cli`), not with a traceback through their imports."""
import os
import signal
import sys


def _interrupted(signum, frame):
    print("\ninterrupted while starting: nothing was done", file=sys.stderr, flush=True)
    os._exit(130)  # not sys.exit: raised inside some library code (a __del__, a callback) it would be ignored


def ready() -> None:
    """Hand Ctrl-C back to Python (KeyboardInterrupt, which run_cli answers) once the script's work starts."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the shell ignores it (`command &`)
    signal.signal(signal.SIGINT, _interrupted)
