"""nightly --serve_at: when each night starts (catch-up after downtime, a failed night waits a day), and the
service's loop on a clock that tests can move."""
import datetime

import pytest

from beam_pipeline import nightly_schedule as sched

UTC = datetime.timezone.utc
AT = sched.parse_serve_at("02:00")


def _t(day: int, hour: int, minute: int = 0) -> datetime.datetime:
    return datetime.datetime(2026, 12, day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize("now,last,expected", [
    (_t(3, 1), "2026-12-02", _t(3, 2)),        # before today's hour, yesterday done: today at 02:00
    (_t(3, 5), "2026-12-03", _t(4, 2)),        # today done: tomorrow
    (_t(3, 1), "2026-12-03", _t(4, 2)),        # today done already (by hand, early): tomorrow
    (_t(3, 5), "2026-12-02", _t(3, 5)),        # today's hour passed, not done (the service was down): now
    (_t(3, 5), "2026-11-20", _t(3, 5)),        # many nights missed: one night, now
    (_t(3, 1), None, _t(3, 1)),                # never run: now
    (_t(3, 2), "2026-12-02", _t(3, 2)),        # exactly the hour
])
def test_next_night(now, last, expected):
    assert sched.next_night(now, AT, last) == expected


@pytest.mark.parametrize("text", ["2", "25:00", "02:60", "2am", "", "02:00:00"])
def test_a_bad_serve_at_is_refused_naming_the_flag(text):
    with pytest.raises(ValueError, match="--serve_at is a time of day HH:MM"):
        sched.parse_serve_at(text)


class FakeClock:
    """A UTC clock that only sleeping moves; stops the service (as SIGTERM would) after `stop_after` nights."""

    def __init__(self, start, nights, stop_after):
        self.now, self.nights, self.stop_after = start, nights, stop_after

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        assert 0 < seconds <= sched.POLL_SECONDS
        if len(self.nights) >= self.stop_after:
            raise KeyboardInterrupt
        self.now += datetime.timedelta(seconds=seconds)


def test_nights_run_at_their_hour_a_failed_one_waits_a_day_and_a_stop_ends_the_service():
    calls = []  # (run_date, the clock when the night started)
    committed = {"date": "2026-12-01"}

    def run_night(run_date):
        calls.append((run_date, clock.now))
        if run_date == "2026-12-03":
            raise OSError("the catalogue's bucket is unreachable")
        if run_date == "2026-12-04":
            raise RuntimeError("a bug")
        committed["date"] = run_date
        return {"generation": f"{run_date}-g", "full": False, "seconds": {"total": 1.5}}

    clock = FakeClock(_t(2, 9), calls, stop_after=4)  # started after the night of the 2nd was missed
    summary = sched.serve(run_night, AT, lambda: committed["date"], clock=clock, sleep=clock.sleep)
    assert calls == [("2026-12-02", _t(2, 9)), ("2026-12-03", _t(3, 2)), ("2026-12-04", _t(4, 2)),
                     ("2026-12-05", _t(5, 2))]  # the failed 3rd and 4th were not retried before their next hour
    assert summary["stopped"] == "interrupted" and summary["serve_at"] == "02:00 UTC"
    assert summary["nights"][0] == {"run_date": "2026-12-02", "generation": "2026-12-02-g", "full": False,
                                    "seconds": 1.5}
    assert summary["nights"][1] == {"run_date": "2026-12-03", "error": "the catalogue's bucket is unreachable"}
    assert summary["nights"][2] == {"run_date": "2026-12-04", "error": "RuntimeError: a bug"}
    assert summary["nights"][3]["generation"] == "2026-12-05-g"


def test_an_interrupt_during_a_night_stops_the_service():
    def run_night(run_date):
        raise KeyboardInterrupt  # SIGINT or SIGTERM while a night runs: the night is abandoned (state as before)

    summary = sched.serve(run_night, AT, lambda: None, clock=lambda: _t(3, 5), sleep=lambda s: None)
    assert summary == {"serve_at": "02:00 UTC", "nights": [], "stopped": "interrupted"}


def test_a_state_that_cannot_be_read_is_tried_again_a_minute_later():
    reads, sleeps, calls = [], [], []

    def last_run_date():
        reads.append(1)
        if len(reads) < 3:
            raise OSError("gs://bucket/state: 503 Service Unavailable")
        return "2026-12-02"

    def sleep(seconds):
        sleeps.append(seconds)

    def run_night(run_date):
        calls.append(run_date)
        raise KeyboardInterrupt  # stop the service here

    summary = sched.serve(run_night, AT, last_run_date, clock=lambda: _t(3, 5), sleep=sleep)
    assert sleeps == [sched.POLL_SECONDS, sched.POLL_SECONDS] and calls == ["2026-12-03"]
    assert summary["nights"] == [] and summary["stopped"] == "interrupted"
