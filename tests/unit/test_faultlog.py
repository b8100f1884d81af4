import logging

from gateway.errors import AccountingError
from gateway.faultlog import FailureLog


def test_one_line_per_burst_then_summary_then_recovery(caplog) -> None:  # type: ignore[no-untyped-def]
    now = [0.0]
    log = FailureLog(logging.getLogger("t"), "let through", report_every=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t"):
        for i in range(1000):
            now[0] = i * 0.001
            log.failure(AccountingError("connect_error", "refused"))
        assert len(caplog.records) == 1
        now[0] = 11.0
        log.failure(AccountingError("timeout", "slow"))
        assert len(caplog.records) == 2 and "1000 failures" in caplog.records[1].getMessage()
        log.success()
        log.success()
        assert len(caplog.records) == 3 and "recovered after 1001" in caplog.records[2].getMessage()
    assert all(r.exc_info is None for r in caplog.records)
