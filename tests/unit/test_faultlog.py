import logging

import pytest

from gateway.errors import AccountingError
from gateway.faultlog import FailureLog


def _log(now: list[float]) -> FailureLog:
    return FailureLog(logging.getLogger("t"), "let through", report_every=10, quiet=5, clock=lambda: now[0])


def test_one_line_per_burst_then_summary_then_recovery(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = _log(now)
    with caplog.at_level(logging.WARNING, logger="t"):
        for i in range(1000):
            now[0] = i * 0.001
            log.failure(AccountingError("connect_error", "refused"))
        assert len(caplog.records) == 1
        now[0] = 11.0
        log.failure(AccountingError("connect_error", "refused"))
        assert len(caplog.records) == 2 and "1000 failures" in caplog.records[1].getMessage()
        log.success()  # 0 s after the last failure: not yet
        now[0] = 16.0
        log.success()
        log.success()
        assert len(caplog.records) == 3 and "connect_error: 1001 failures" in caplog.records[2].getMessage()
        assert not log.failing
    assert all(r.exc_info is None for r in caplog.records)


def test_one_bad_key_among_many_good_ones_is_one_burst(caplog: pytest.LogCaptureFixture) -> None:
    # One key of the wrong type among 200 clients under load: successes and failures interleave.
    # Closing the burst on any success logged 1,000+ lines in 5 s; per-kind bursts with a quiet
    # period log one line until the key is fixed, then one when it has been quiet for 5 s.
    now = [0.0]
    log = _log(now)
    wrongtype = AccountingError("redis:WRONGTYPE", "WRONGTYPE Operation against a key holding the wrong kind of value")
    with caplog.at_level(logging.WARNING, logger="t"):
        for i in range(50_000):  # 10,000 requests a second for 5 s
            now[0] = i / 10_000
            if i % 200 == 7:
                log.failure(wrongtype)
            else:
                log.success()
        assert len(caplog.records) == 1 and "redis:WRONGTYPE" in caplog.records[0].getMessage()
        now[0] = 12.0
        log.success()
        assert len(caplog.records) == 2 and "redis:WRONGTYPE: 250 failures" in caplog.records[1].getMessage()


def test_kinds_have_their_own_bursts(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = _log(now)
    with caplog.at_level(logging.WARNING, logger="t"):
        log.failure(AccountingError("timeout", "slow"))
        now[0] = 1.0
        log.failure(AccountingError("connection_lost", "reset"))
        log.failure(AccountingError("timeout", "slow"))
        assert len(caplog.records) == 2  # one opening line per kind
        now[0] = 4.0
        log.failure(AccountingError("connection_lost", "reset"))
        now[0] = 6.5
        log.success()  # timeout quiet for 5.5 s: closed; connection_lost only for 2.5 s
        assert len(caplog.records) == 3 and "timeout" in caplog.records[2].getMessage()
        assert "connection_lost" not in caplog.records[2].getMessage() and log.failing
        now[0] = 9.0
        log.success()
        assert len(caplog.records) == 4 and "connection_lost: 2 failures" in caplog.records[3].getMessage()
        assert not log.failing
