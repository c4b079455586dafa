"""Child processes: pinned to a core, and their own CPU time and memory from /proc."""

import os
import shutil
from collections.abc import Sequence

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a whole process (all its threads) so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state) of proc(5); utime and stime are fields 14 and 15.
    return int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a whole process (all its threads) so far."""
    return sum(cpu_times(pid))


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of all the process's live threads so far."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status", encoding="ascii") as file:
                for line in file:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return total


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pinned(command: Sequence[str], core: int | None) -> list[str]:
    """``taskset -c CORE command``; the command as is when there is no core to pin to."""
    if core is None:
        return list(command)
    taskset = shutil.which("taskset")
    if taskset is None:
        raise RuntimeError("taskset not found (package util-linux); run with --no-pin")
    return [taskset, "-c", str(core), *command]
