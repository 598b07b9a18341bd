"""Whether a process on this machine still runs: one answer for the run lock, the prepared-data writers and the
peer watch of a distributed run."""
from __future__ import annotations

import os


def proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields from the state on (field 3 is index 0); None off Linux or if pid is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            line = f.readline()
    except OSError:
        return None
    return line[line.rfind(")") + 2:].split() if line else None  # the command name may hold spaces and ')'


def process_alive(pid: int) -> bool:
    """Whether pid runs: it exists (another user's counts) and is no zombie, killed but not yet reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    fields = proc_stat(pid)
    return not (fields and fields[0] in ("Z", "X"))
