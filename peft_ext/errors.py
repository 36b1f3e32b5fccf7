"""Bad input ends a script with one clear line on stderr and a non-zero exit, never a traceback; so does Ctrl-C."""
import sys

import fire
from tqdm import tqdm


class UsageError(Exception):
    """An input problem the user can fix; its message names the problem and the fix."""


def run_cli(fn, interrupted: str = "") -> None:
    """`fire.Fire(fn)`, turning a UsageError into `error: ...` on stderr and exit status 2, and Ctrl-C into
    `interrupted: ...` (what is kept and how to go on, as `interrupted` says) and the shell's status 130."""
    try:
        fire.Fire(fn)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        for bar in list(getattr(tqdm, "_instances", ())):  # closed now, not redrawn at exit below the message
            bar.close()
        print(f"\ninterrupted{': ' + interrupted if interrupted else ''}", file=sys.stderr)
        sys.exit(130)
