"""CPU time of a bench's child processes, which a wall time alone hides: on a shared machine a slow
run with the same CPU time was slowed by its neighbours, not by the code."""
from __future__ import annotations

import resource


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process so far (their threads and workers too)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
