"""Quiet machine or no headline: the load check a benchmark runs before and after its timed part.

A timing taken beside another heavy job is not what a user gets (the decoding bench once ran torch on one thread
beside ``make all`` and reported NEST at 0.5-0.7x the base LM; measured quietly it is 2-3x). So a benchmark that
publishes headline figures checks the machine:

    from bench import quiet

    mon = quiet.LoadMonitor()          # at the start: samples this process's own CPU use from now on
    ...build inputs, warm up...
    start = mon.sample("at the start")  # refuse at once when busy already
    before = mon.sample("before the timed part")
    ...timed part (call mon.sample() now and then: per example)...
    after = mon.sample("after the timed part")
    verdict = quiet.judge(before, after)   # {"quiet", "refused", "busy", "reason", ...}

**The rule.** The 1-minute load average of the *other* processes, before the timed part and after it, must not exceed
``LIMIT_PER_CORE`` (0.3) × ``os.cpu_count()``. The load average counts this process's own threads too: after minutes of
torch on every core it is about the number of cores whatever else runs, and the input building before the timed part
leaves its own trace. So the check subtracts this process's own share, computed from its CPU time
(``resource.getrusage``, children included) sampled at each :meth:`LoadMonitor.sample`, weighted as the kernel weights
the 1-minute average (exponential, time constant 60 s). A thread waiting for a core counts as load but not as CPU
time: a contended machine shows more "other" load, never less (the check errs on the side of refusing).

When the check fails, the benchmark sets ``result["refused"]`` to the one-line reason: ``bench/run.py`` then writes
``<name>-busy.json/.md`` instead of the headline files, prints the reason, and exits non-zero (``make bench`` fails).
``NEST_BENCH_ALLOW_BUSY=1`` runs anyway: nothing is refused, the markdown says "measured under load"
(``result["busy"]``).
"""

from __future__ import annotations

import math
import os
import resource
import time

LIMIT_PER_CORE = 0.3
ALLOW_ENV = "NEST_BENCH_ALLOW_BUSY"
TAU_S = 60.0  # the 1-minute load average's time constant
BUSY_LABEL = "measured under load"


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its waited-for children so far."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def allow_busy() -> bool:
    return os.environ.get(ALLOW_ENV, "").strip() not in ("", "0", "false", "no")


class LoadMonitor:
    """Samples of (wall time, own CPU seconds); :meth:`own_load` is this process's part of the 1-minute load average.

    ``clock``/``cpu``/``loadavg`` are injectable for tests."""

    def __init__(self, clock=time.monotonic, cpu=cpu_seconds, loadavg=None, age_s: float | None = None):
        self.clock, self.cpu = clock, cpu
        self.loadavg = loadavg  # None: os.getloadavg, looked up at each sample
        now, used = clock(), cpu()
        age = _process_age_s() if age_s is None else age_s
        # the CPU this process used before the monitor started, spread over its life so far (an earlier benchmark of
        # the same `bench.run`, imports): a first interval, so that it is subtracted too
        self.samples: list[tuple[float, float]] = []
        if age and used > 0:
            self.samples.append((now - max(age, 1e-3), 0.0))
        self.samples.append((now, used))

    def mark(self) -> None:
        """Record a sample (cheap: call it between timed calls so the own-load estimate follows the run)."""
        self.samples.append((self.clock(), self.cpu()))

    def own_load(self) -> float:
        """This process's contribution to the 1-minute load average now: Σ over sampled intervals of its mean CPU
        rate × the weight the kernel's exponential average gives that interval."""
        t_end = self.samples[-1][0]
        total = 0.0
        for (a, ca), (b, cb) in zip(self.samples, self.samples[1:]):
            if b <= a:
                continue
            rate = max(cb - ca, 0.0) / (b - a)
            total += rate * (math.exp(-(t_end - b) / TAU_S) - math.exp(-(t_end - a) / TAU_S))
        return total

    def sample(self, when: str) -> dict:
        """``when`` (a phrase: "before the timed part"), the load averages now, this process's own share of the 1-minute one, and the others' (the difference)."""
        self.mark()
        load = [round(float(x), 2) for x in (self.loadavg or os.getloadavg)()]
        own = self.own_load()
        return {"when": when, "loadavg": load, "own_1min": round(own, 2), "others_1min": round(max(load[0] - own, 0.0), 2)}


def judge(before: dict, after: dict | None = None, cpus: int | None = None, limit_per_core: float = LIMIT_PER_CORE,
          allowed: bool | None = None) -> dict:
    """The verdict on samples of :meth:`LoadMonitor.sample`: ``quiet`` (both within the limit), ``busy`` (the reason,
    or None), ``refused`` (the reason when busy and ``NEST_BENCH_ALLOW_BUSY`` is not set, else None)."""
    cpus = cpus or os.cpu_count() or 1
    limit = round(limit_per_core * cpus, 2)
    over = [s for s in (before, after) if s is not None and s["others_1min"] > limit]
    reason = None
    if over:
        reason = ("machine busy: 1-minute load of other processes " +
                  ", ".join(f"{s['when']} {s['others_1min']} (load average {s['loadavg']}, "
                            f"this process {s['own_1min']})" for s in over) +
                  f" > {limit_per_core} per core × {cpus} cores = {limit}")
    allowed = allow_busy() if allowed is None else allowed
    return {"quiet": not over, "limit": limit, "cpus": cpus, "busy": reason,
            "refused": reason if reason and not allowed else None,
            "allow_busy": bool(allowed and reason)}


def describe(verdict: dict, before: dict, after: dict | None) -> str:
    """One markdown line: the load before/after and what the check decided."""
    def one(s):
        return "–" if s is None else f"{s['loadavg']} (this process {s['own_1min']}, others {s['others_1min']})"

    head = (f"Load average (1/5/15 min) {before['when']} {one(before)}, after the timed part {one(after)}; limit for others "
            f"{verdict['limit']} ({LIMIT_PER_CORE} per core × {verdict['cpus']}).")
    if verdict["quiet"]:
        return head + " Quiet: the figures are headline figures."
    if verdict["refused"]:
        return head + f" **Refused** ({verdict['refused']}): these are not headline figures."
    return head + f" **{BUSY_LABEL.capitalize()}** ({ALLOW_ENV}=1): not headline figures."
