"""The nightly run as a service: one process that stays up and runs the night at its hour, every day.

    siamese-dedup nightly --catalogue ... --model_dir ... --state ... --serve_at 02:00

A timer (systemd, cron, Cloud Scheduler) starts a new process each night, and that process first imports
TensorFlow and Beam: about 8 s on the 2-core reference machine, whatever the night holds (BENCHMARKS.md,
"Nightly"). A service pays it once, at its start, so a night costs only its own work. Each night is the
same run as `siamese-dedup nightly` started by hand (its lock, its state, its outputs); this module only
says when. Times are UTC, as --run_date is.

Catch-up, as systemd's `Persistent=true` timers do: a night missed while the service was down (no
committed run dated today once today's hour has passed, or no run at all yet) runs when the service
starts. A night that fails is logged and not retried until the next night's hour.
"""
from __future__ import annotations

import datetime
import logging
import time
from typing import Callable

LOG = logging.getLogger(__name__)
# The longest single sleep: a clock set forward or a machine resumed from suspend is noticed within it.
POLL_SECONDS = 60.0
# The errors a night can end with that are the night's, not the service's (a catalogue gone, a lock held, a
# bucket unreachable): logged in one line. Anything else is logged with its traceback. Either way the
# service waits for the next night.
NIGHT_ERRORS = (ValueError, OSError)


def parse_serve_at(text: str) -> datetime.time:
    """"HH:MM" (24-hour, UTC) -> datetime.time; ValueError naming the flag otherwise."""
    try:
        hours, minutes = (int(part) for part in text.split(":"))
        return datetime.time(hours, minutes, tzinfo=datetime.timezone.utc)
    except ValueError:
        raise ValueError(f"--serve_at is a time of day HH:MM (UTC, 24-hour), got {text!r}") from None


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def next_night(now: datetime.datetime, at: datetime.time, last_run_date: str | None) -> datetime.datetime:
    """When the next night starts, given the time `now` (UTC, aware), the hour `at` and the date of the last
    night run or tried (YYYY-MM-DD; None when there is none).

    `now` when today's night is due and not yet done (today's `at` has passed, or there was never a
    night); otherwise the next `at` after the last night's date: today's, or tomorrow's.
    """
    today = now.date()
    todays = datetime.datetime.combine(today, at)
    if last_run_date is None:
        return now
    if last_run_date >= today.isoformat():
        return datetime.datetime.combine(today + datetime.timedelta(days=1), at)
    return max(now, todays)


def serve(run_night: Callable[[str], dict], at: datetime.time, last_run_date: Callable[[], str | None], *,
          clock: Callable[[], datetime.datetime] = utc_now, sleep: Callable[[float], None] = time.sleep) -> dict:
    """Run `run_night(run_date)` at `at` every day, until interrupted (KeyboardInterrupt: SIGINT, or SIGTERM
    through beam_pipeline.cli); returns {"serve_at": "HH:MM UTC", "nights": [...], "stopped": "interrupted"}.

    last_run_date() is the date of the state's committed night (None before the first). Each entry of
    "nights" is {"run_date", "generation", "full", "seconds"} of a night that committed, or {"run_date",
    "error"} of one that failed. A night interrupted midway ends as any interrupted run: its lock released,
    the state as before it (beam_pipeline.nightly). A state that cannot be read (NIGHT_ERRORS from
    last_run_date: a bucket unreachable) is tried again POLL_SECONDS later. `clock` and `sleep` are there
    for tests, which cannot wait a day.
    """
    nights: list[dict] = []
    tried: str | None = None  # the last night started here, committed or not: a failed night waits a day
    summary = {"serve_at": f"{at.strftime('%H:%M')} UTC", "nights": nights, "stopped": "interrupted"}
    try:
        while True:
            try:
                committed = last_run_date()
            except NIGHT_ERRORS as err:
                LOG.error("nightly service: the state cannot be read (%s); trying again in %.0f s",
                          " ".join(str(err).split()), POLL_SECONDS)
                sleep(POLL_SECONDS)
                continue
            done = max(filter(None, (committed, tried)), default=None)
            when = next_night(clock(), at, done)
            LOG.info("nightly service: next night %s", when.isoformat(timespec="seconds"))
            while (left := (when - clock()).total_seconds()) > 0:
                sleep(min(left, POLL_SECONDS))
            tried = when.date().isoformat()
            nights.append(_logged_night(run_night, tried))
    except KeyboardInterrupt:
        LOG.info("nightly service: stopped after %d nights", len(nights))
    return summary


def _logged_night(run_night: Callable[[str], dict], run_date: str) -> dict:
    """One night of the service: its summary entry; an error is logged, not raised."""
    try:
        manifest = run_night(run_date)
    except NIGHT_ERRORS as err:
        LOG.error("nightly %s failed: %s", run_date, " ".join(str(err).split()) or type(err).__name__)
        return {"run_date": run_date, "error": str(err)}
    except Exception as err:  # noqa: BLE001 -- a service outlives a bad night; the traceback goes to the log
        LOG.exception("nightly %s failed", run_date)
        return {"run_date": run_date, "error": f"{type(err).__name__}: {err}"}
    return {"run_date": run_date, "generation": manifest["generation"], "full": manifest["full"],
            "seconds": manifest["seconds"]["total"]}
