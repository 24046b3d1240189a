"""The errors a user can cause or fix, and how every entry point reports them.

Two families, both ending as one line on stderr (never a traceback):

- `UserError` (exit 2): something the user wrote or pointed at is wrong — a config value, a seed file, a dialogs
  file, a missing model path, a missing API key. The message names the key, file or line and the fix.
- `Interrupted` (exit 75, EX_TEMPFAIL: "try again later"): a stage stopped for a transient reason (an endpoint
  down, requests that failed after their retries). What was finished is kept on disk, and the message says which
  command resumes it.

The lower layers raise their own subclasses (ConfigError, SeedFileError, JsonlError, ChatError, ...); the entry
points (`run.py`, the `baize-*` console scripts) catch these two bases in `exit_on_error`.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from collections.abc import Iterator

EXIT_USER = 2
EXIT_TRANSIENT = 75  # sysexits.h EX_TEMPFAIL


class UserError(Exception):
    """A problem the user can fix; the message says where and how."""


class ExportError(UserError):
    """An export that cannot be done (a dialogs file, an adapter to merge), naming the file and what to do."""


class Interrupted(Exception):
    """A stage stopped for a transient reason; what is finished is kept and a rerun resumes."""


def resume_command(run_dir: str | None = None) -> str:
    """The command line that reruns this invocation, pinned to its run dir so it resumes there."""
    argv = [a for a in sys.argv[1:] if not a.startswith("hydra.run.dir=")]
    prog = "python " + (sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else "run.py")
    pinned = [f"hydra.run.dir={run_dir}"] if run_dir else []
    return " ".join([prog, *map(shlex.quote, argv + pinned)])


@contextlib.contextmanager
def exit_on_error(prog: str, reraise: bool = False) -> Iterator[None]:
    """Turn the two families into one line and an exit status; `reraise` (a Hydra multirun job) lets the error
    through so the launcher marks that job failed and the sweep's other jobs still run."""
    try:
        yield
    except (UserError, Interrupted) as e:
        if reraise:
            raise
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(EXIT_USER if isinstance(e, UserError) else EXIT_TRANSIENT)
