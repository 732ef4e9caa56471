"""iter_studies: input order, per-item errors, a dying worker costs one item, bounded prefetch."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pathlib import Path

import numpy as np

from cspine_submit.read.dicom import read_slices, scan_study
from cspine_submit.read import pixels
from cspine_submit.read.reader import RETRIED, WORKER_DIED, Outcome, iter_studies

SERIES = Path(__file__).parent / "data" / "dicom" / "series_j2k_ct"


# Work functions must be top-level (picklable by reference) for the spawned workers.
def square_slowly(x: int) -> int:
    # Earlier items take longer, so with 2 workers later items finish first: order must still hold.
    time.sleep(0.05 * (3 - x) if x < 3 else 0.0)
    return x * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise RuntimeError(f"cannot read study {x}")
    return x + 100


def die_on_two(x: int) -> int:
    if x == 2:
        os.kill(os.getpid(), signal.SIGSEGV)  # what a crashing C decoder does to its process
    if x == 4:
        os._exit(3)
    return -x


def unpicklable_result(x: int):
    return (lambda: x) if x == 1 else x  # a lambda cannot travel back from a worker


def test_unpicklable_result_costs_only_its_item():
    out = list(iter_studies(range(3), unpicklable_result, workers=1, prefetch=2))
    assert [o.value for o in out] == [0, None, 2]
    assert out[1].error and "pickle" in out[1].error.lower()


def hang_on_one(x: int) -> int:
    if x == 1:
        time.sleep(120)  # a decoder stuck on a corrupt file
    return x


def test_hung_item_times_out_and_the_rest_go_on():
    out = list(iter_studies(range(4), hang_on_one, workers=2, prefetch=3, timeout=2.0))
    assert [o.value for o in out] == [0, None, 2, 3]
    assert out[1].error == "timed out after 2.0 s"


def read_two_slices(folder: str):
    header = scan_study(folder)
    return header, read_slices(header, [0, header.n_slices - 1])


def test_real_study_through_a_worker_and_a_missing_one(tmp_path):
    missing = tmp_path / "gone"
    out = list(iter_studies([str(SERIES), str(missing), str(SERIES)], read_two_slices, workers=1, prefetch=2))
    header, slices = out[0].value
    assert header.n_slices == 20 and slices.shape == (2, 512, 512) and slices.dtype == np.float32
    np.testing.assert_array_equal(slices, out[2].value[1])
    np.testing.assert_array_equal(slices, read_two_slices(str(SERIES))[1])  # same pixels as in-process
    assert out[1].value is None and out[1].error.startswith(f"DicomReadError: {missing}: no such study folder")


def sleep_one_second(x: int) -> int:
    time.sleep(1.0)
    return x


def test_timeout_counts_from_the_start_of_the_item_not_from_queueing():
    # One worker, three 1 s items: item 2 waits 2 s in the queue (item 0 also waits for the worker to
    # start), yet none of them ran for 1.8 s.
    out = list(iter_studies(range(3), sleep_one_second, workers=1, prefetch=3, timeout=1.8))
    assert [(o.value, o.error) for o in out] == [(0, None), (1, None), (2, None)]


def test_in_process_runs_in_order_and_reports_errors():
    out = list(iter_studies(range(6), fail_on_three, workers=0))
    assert [o.item for o in out] == [0, 1, 2, 3, 4, 5]
    assert [o.value for o in out] == [100, 101, 102, None, 104, 105]
    assert out[3].error.startswith("RuntimeError: cannot read study 3")
    assert all(o.ok for i, o in enumerate(out) if i != 3) and not out[3].ok
    assert all(isinstance(o, Outcome) and o.seconds >= 0 for o in out)


def test_workers_keep_input_order_and_report_errors():
    out = list(iter_studies(range(6), square_slowly, workers=2, prefetch=3))
    assert [(o.item, o.value, o.error) for o in out] == [(i, i * i, None) for i in range(6)]
    assert out[0].seconds >= 0.1  # measured inside the worker: item 0 slept 0.15 s
    errs = list(iter_studies(range(5), fail_on_three, workers=2))
    assert [o.value for o in errs] == [100, 101, 102, None, 104]
    assert "cannot read study 3" in errs[3].error


def test_dying_worker_costs_only_its_item():
    out = list(iter_studies(range(7), die_on_two, workers=2, prefetch=4))
    assert [o.item for o in out] == list(range(7))
    assert [o.value for o in out] == [0, -1, None, -3, None, -5, -6]
    assert out[2].error.startswith(WORKER_DIED) and out[4].error.startswith(WORKER_DIED)
    assert [o.error is None for o in out] == [True, True, False, True, False, True, True]


def crash_on_direct_decode(x: int) -> int:
    from cspine_submit.read import pixels

    if x == 1 and pixels.direct_enabled():
        os.kill(os.getpid(), signal.SIGSEGV)  # a direct decoder crashing on this study's file
    return x + 10


def test_dead_worker_item_is_retried_once_on_pydicoms_route():
    out = list(iter_studies(range(4), crash_on_direct_decode, workers=2, prefetch=3))
    assert [o.value for o in out] == [10, 11, 12, 13]
    assert out[1].retried and out[1].retried.startswith(RETRIED) and out[1].error is None
    assert [o.retried is None for o in out] == [True, False, True, True]
    assert os.environ.get(pixels.DISABLE_ENV, "") in ("", "0")  # only the retry's worker turned the direct route off
    died = list(iter_studies(range(3), die_on_two, workers=1, prefetch=2))
    assert died[2].error.startswith(WORKER_DIED) and "died again" in died[2].error


def test_prefetch_bounds_items_taken_ahead():
    pulled = []

    def items():
        for i in range(50):
            pulled.append(i)
            yield i

    stream = iter_studies(items(), fail_on_three, workers=0)
    first = next(stream)
    assert first.item == 0 and len(pulled) == 1  # in-process: nothing taken ahead
    stream.close()

    pulled.clear()
    stream = iter_studies(items(), square_slowly, workers=1, prefetch=3)
    first = next(stream)
    assert first.value == 0 and len(pulled) == 3  # the yielded item and two more in flight, not all 50
    second = next(stream)
    assert second.value == 1 and len(pulled) == 4
    stream.close()  # stopping early shuts the pool down


def test_bad_arguments():
    with pytest.raises(ValueError, match="prefetch"):
        list(iter_studies([1], square_slowly, workers=1, prefetch=0))


def test_wait_polls_through_the_futures_timeout_class():
    # Before Python 3.11 concurrent.futures.TimeoutError is not the built-in TimeoutError: a queued item whose
    # clock has not started must keep being polled, not be failed as "TimeoutError" (the first study on 3.10).
    import concurrent.futures

    from cspine_submit.read.reader import _Pool

    class SlowFuture:
        calls = 0

        def result(self, timeout=None):
            SlowFuture.calls += 1
            if SlowFuture.calls < 3:
                raise concurrent.futures.TimeoutError
            return "done"

    pool = object.__new__(_Pool)
    pool.starts = [0.0]  # not started yet: polled every 0.2 s
    assert pool.wait(SlowFuture(), 0, timeout=5.0) == "done" and SlowFuture.calls == 3
