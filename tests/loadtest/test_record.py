from __future__ import annotations

from loadtest.record import Failure, RequestRecord, RequestTracker, Timeouts

T0 = 1000.0


def _tracker(timeouts: Timeouts | None = None) -> RequestTracker:
    record = RequestRecord(
        target="bridge", index=0, request_id="r0", user=0, stage=0, steady=True, scheduled_s=0.0
    )
    tracker = RequestTracker(record, T0, timeouts or Timeouts())
    tracker.on_sent(T0 + 0.001)
    return tracker


def _stream(tracker: RequestTracker, seqs: list[int], content: str = "abcd") -> None:
    tracker.on_ack(T0 + 0.010, ok=True, path="stream", code=None)
    for i, seq in enumerate(seqs):
        tracker.on_chunk(T0 + 0.100 + 0.010 * i, seq, "abcd"[seq])
    tracker.on_end(T0 + 0.200, content)
    tracker.on_done(T0 + 0.210, ok=True, path="stream", code=None)


def test_clean_stream_times_everything_from_the_scheduled_send() -> None:
    tracker = _tracker()
    _stream(tracker, [0, 1, 2, 3])
    r = tracker.record
    assert tracker.finished and r.ok
    assert round(r.ack_ms or 0, 6) == 10.0 and round(r.ttft_ms or 0, 6) == 100.0
    assert round(r.completion_ms or 0, 6) == 200.0 and round(r.done_ms or 0, 6) == 210.0
    assert [round(g, 6) for g in r.gaps_ms] == [10.0, 10.0, 10.0]
    assert r.correctness_violations() == 0 and r.path == "stream" and r.chunks == 4


def test_duplicate_seq_is_counted_and_dropped() -> None:
    tracker = _tracker()
    _stream(tracker, [0, 1, 1, 2, 3])
    assert tracker.record.duplicates == 1 and not tracker.record.content_mismatch


def test_missing_seq_counts_a_gap_and_a_content_mismatch() -> None:
    tracker = _tracker()
    _stream(tracker, [0, 1, 3])
    assert tracker.record.seq_gaps == 1 and tracker.record.content_mismatch


def test_reordered_chunks_count_out_of_order_but_content_still_matches() -> None:
    tracker = _tracker()
    _stream(tracker, [0, 2, 1, 3])
    assert tracker.record.out_of_order == 1 and not tracker.record.content_mismatch


def test_end_content_differing_from_chunks_is_a_mismatch() -> None:
    tracker = _tracker()
    _stream(tracker, [0, 1, 2, 3], content="abcdX")
    assert tracker.record.content_mismatch and tracker.record.ok


def test_done_ack_without_terminal_event_is_missing_terminal() -> None:
    tracker = _tracker()
    tracker.on_ack(T0 + 0.01, ok=True, path="stream", code=None)
    tracker.on_done(T0 + 0.2, ok=True, path="stream", code=None)
    assert tracker.record.missing_terminal


def test_rejected_ack_fails_with_its_code() -> None:
    tracker = _tracker()
    tracker.on_ack(T0 + 0.01, ok=False, path=None, code="RATE_LIMITED")
    assert tracker.finished
    assert (tracker.record.failure, tracker.record.code) == (Failure.REJECTED, "RATE_LIMITED")


def test_ai_error_waits_for_done_and_keeps_the_error_code() -> None:
    tracker = _tracker()
    tracker.on_ack(T0 + 0.01, ok=True, path="stream", code=None)
    tracker.on_error(T0 + 0.05, "MODEL_ERROR")
    assert not tracker.finished
    tracker.on_done(T0 + 0.06, ok=False, path="stream", code="MODEL_ERROR")
    assert tracker.finished
    assert (tracker.record.failure, tracker.record.code) == (Failure.AI_ERROR, "MODEL_ERROR")


def test_deadlines_classify_ack_timeout_ttft_timeout_stall_and_missing_done() -> None:
    limits = Timeouts(ack_s=1.0, ttft_s=2.0, stall_s=0.5, total_s=10.0, done_s=1.0)
    no_ack = _tracker(limits)
    no_ack.check_deadlines(T0 + 0.9)
    assert not no_ack.finished
    no_ack.check_deadlines(T0 + 1.1)
    assert no_ack.record.failure == Failure.ACK_TIMEOUT

    no_chunk = _tracker(limits)
    no_chunk.on_ack(T0 + 0.1, ok=True, path="stream", code=None)
    no_chunk.check_deadlines(T0 + 2.1)
    assert no_chunk.record.failure == Failure.TIMEOUT
    assert no_chunk.record.correctness_violations() == 0  # a failure, not counted twice

    stalled = _tracker(limits)
    stalled.on_ack(T0 + 0.1, ok=True, path="stream", code=None)
    stalled.on_chunk(T0 + 0.2, 0, "a")
    stalled.check_deadlines(T0 + 0.6)
    assert not stalled.finished
    stalled.check_deadlines(T0 + 0.8)
    assert stalled.record.failure == Failure.STALL

    no_done = _tracker(limits)
    no_done.on_ack(T0 + 0.1, ok=True, path="stream", code=None)
    no_done.on_end(T0 + 0.2, "")
    no_done.check_deadlines(T0 + 1.3)
    assert no_done.finished and no_done.record.ok and no_done.record.missing_done


def test_disconnect_mid_stream_is_its_own_class() -> None:
    tracker = _tracker()
    tracker.on_ack(T0 + 0.01, ok=True, path="stream", code=None)
    tracker.on_chunk(T0 + 0.1, 0, "a")
    tracker.on_disconnect(T0 + 0.2)
    assert tracker.record.failure == Failure.DISCONNECT
    assert not tracker.record.missing_terminal
    assert tracker.record.ttft_ms is not None  # what was measured before the drop is kept


def test_record_round_trips_through_json() -> None:
    tracker = _tracker()
    _stream(tracker, [0, 1, 2, 3])
    data = tracker.record.to_json()
    assert RequestRecord.from_json(data) == tracker.record
