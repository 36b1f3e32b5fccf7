"""Bad input ends a script with one clear line on stderr and a non-zero exit, never a traceback."""
import sys

import fire


class UsageError(Exception):
    """An input problem the user can fix; its message names the problem and the fix."""


def run_cli(fn) -> None:
    """`fire.Fire(fn)`, turning a UsageError into `error: ...` on stderr and exit status 2."""
    try:
        fire.Fire(fn)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
