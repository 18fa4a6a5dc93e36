"""How the jobs that talk to a served model end (jobs/caption.py, jobs/build_pe_data.py,
jobs/enhance_prompts.py): one exit status per way of stopping, and one line on stderr saying why."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

from captioning.client import ServerGone, ServerUnreachable
from captioning.config import ConfigError
from captioning.pipeline import CommitFailed

EXIT_STATUS: dict[type[Exception], int] = {ConfigError: 2, ServerUnreachable: 2, ServerGone: 3, CommitFailed: 4}
"""2: could not run (bad config / input, server unreachable at the start); 3: the server went away
for longer than --server-patience (finished rows committed; rerun to resume); 4: a Lance commit failed."""


def exit_status(work: Callable[[], Iterable[str]]) -> int:
    """Run `work`, print the summary lines it returns and give 0; on a way of stopping named in
    EXIT_STATUS print `error: <message>` as one line on stderr and give its status."""
    try:
        lines = list(work())
    except tuple(EXIT_STATUS) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return next(code for kind, code in EXIT_STATUS.items() if isinstance(e, kind))
    if lines:
        print("\n".join(lines))
    return 0
