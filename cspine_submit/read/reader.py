"""Stream studies through a pool of worker processes with bounded prefetch.

While the caller works on study i (e.g. the GPU scores it), worker processes already scan and decode
studies i+1 .. i+prefetch. Results come back in input order, one :class:`Outcome` per item, whether the
work succeeded, raised, or killed its worker process (a decoder segfault costs that study only).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import multiprocessing
import signal
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as _FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from cspine_submit.read import pixels

# Before Python 3.11, Future.result(timeout=...) raises concurrent.futures.TimeoutError, a class of its own rather
# than the built-in TimeoutError: catch both, or on 3.10 an item still queued would be failed as "TimeoutError".
_TIMEOUTS = (TimeoutError, _FutureTimeout)

WORKER_DIED = "worker process died while working on this item (e.g. a crash inside a decoder)"
TIMED_OUT = "timed out"


@dataclass(frozen=True)
class Outcome:
    """What happened to one item.

    Attributes
    ----------
    item : Any
        The input item, as given.
    value : Any
        ``work_fn(item)``, or None when it failed.
    error : str or None
        When it failed: ``"<ExceptionType>: <message> (at <file>:<line>)"`` for an exception raised by
        ``work_fn`` (the line where it was raised), text starting with :data:`WORKER_DIED` when the worker
        process died, ``"timed out after <t> s"``; None on success.
    seconds : float
        Wall time of ``work_fn(item)`` inside the worker (0.0 when the worker died).
    retried : str or None
        Set when the item's first worker died and a fresh one, decoding through pydicom only, gave this outcome
        (:data:`RETRIED` and the first death's cause); None otherwise.
    """

    item: Any
    value: Any = None
    error: str | None = None
    seconds: float = 0.0
    retried: str | None = None

    @property
    def ok(self) -> bool:
        """True when the work returned a value."""
        return self.error is None


# Set in each worker process by _init_worker: shared wall-clock start times, one slot per in-flight item,
# so that the parent can time an item from when it really started (not from worker start-up or queueing).
_STARTS = None


def _init_worker(starts) -> None:
    global _STARTS
    _STARTS = starts
    # Ctrl-C in a terminal reaches the whole process group: the parent stops the pool; a worker's own
    # KeyboardInterrupt would only print a traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _call(work_fn: Callable[[Any], Any], item: Any, slot: int | None = None) -> tuple[Any, str | None, float]:
    """Run ``work_fn(item)`` in a worker; exceptions become text so that unpicklable ones cannot break the pool."""
    if slot is not None and _STARTS is not None:
        _STARTS[slot] = time.time()
    start = time.perf_counter()
    try:
        return work_fn(item), None, time.perf_counter() - start
    except Exception as exc:  # the caller decides what an error means; the stream goes on
        where = traceback.extract_tb(exc.__traceback__)[-1:]
        at = f" (at {where[0].filename}:{where[0].lineno})" if where else ""
        return None, f"{type(exc).__name__}: {exc}{at}", time.perf_counter() - start


def _outcome(item: Any, result: tuple[Any, str | None, float]) -> Outcome:
    value, error, seconds = result
    return Outcome(item=item, value=value, error=error, seconds=seconds)


def iter_studies(
    items: Iterable[Any],
    work_fn: Callable[[Any], Any],
    *,
    workers: int = 2,
    prefetch: int = 4,
    start_method: str = "spawn",
    progress: bool | str = False,
    timeout: float | None = None,
) -> Iterator[Outcome]:
    """Yield ``work_fn(item)`` for every item, in input order, computed ahead in worker processes.

    Parameters
    ----------
    items : iterable
        Consumed lazily (an iterator over a huge test set is fine). Items and results must be picklable.
    work_fn : callable
        A top-level (picklable) function of one item. Its exceptions are caught and reported per item.
    workers : int
        Worker processes; 0 runs everything in this process, one item at a time (tests, debugging): there a
        decoder crash would end the process, which the checked direct routes (:mod:`cspine_submit.read.pixels`:
        the frame checked against the header before any write) are there to prevent.
    prefetch : int
        At most this many items are submitted but not yet yielded; bounds memory to about ``prefetch``
        results (plus the one the caller holds), whatever the number of items. Values below ``workers``
        leave workers idle.
    start_method : str
        multiprocessing start method; ``spawn`` (default) is safe in a process that already runs
        TensorFlow threads, where ``fork`` can deadlock.
    progress : bool or str
        Show a tqdm bar (a str is its description).
    timeout : float, optional
        Seconds an item may run in its worker (counted from when the worker starts it, not from worker
        start-up or queueing). On expiry the workers are killed, the item gets a ``"timed out after <t> s"``
        error, and the other in-flight items are rerun. Ignored with ``workers=0``.

    Yields
    ------
    Outcome
        One per item, in input order. A worker that dies (``os._exit``, segfault) costs only the item it
        was working on: the pool is rebuilt and the other in-flight items are rerun one at a time, so the
        culprit is found for certain; the culprit is then retried once in a fresh worker that decodes every
        slice through pydicom (:attr:`Outcome.retried`), and fails only when that one dies too.
    """
    if workers < 0 or prefetch < 1:
        raise ValueError(f"workers must be >= 0 and prefetch >= 1 (got workers={workers}, prefetch={prefetch})")
    bar = None
    if progress:
        from tqdm import tqdm

        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
        bar = tqdm(total=total, desc=progress if isinstance(progress, str) else "studies", unit="study")
    try:
        if workers == 0:
            for item in items:
                yield _outcome(item, _call(work_fn, item))
                if bar is not None:
                    bar.update(1)
            return
        for outcome in _iter_pool(iter(items), work_fn, workers, prefetch, start_method=start_method, timeout=timeout):
            yield outcome
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


class _Pool:
    """A ProcessPoolExecutor plus the shared start-time slots its workers write."""

    def __init__(self, context, workers: int, starts) -> None:
        self.starts = starts
        self.executor = ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(starts,)
        )

    def submit(self, work_fn: Callable, item: Any, slot: int) -> Future:
        """Submit, or, when the pool already broke (a worker died since the last check), return a future
        failed with BrokenProcessPool so that recovery handles the item like the other in-flight ones."""
        self.starts[slot] = 0.0
        try:
            return self.executor.submit(_call, work_fn, item, slot)
        except BrokenProcessPool as exc:
            failed: Future = Future()
            failed.set_exception(exc)
            return failed

    def wait(self, future: Future, slot: int, timeout: float | None):
        """``future.result()``; raises TimeoutError once the item has *run* for ``timeout`` seconds."""
        if timeout is None:
            return future.result()
        while True:
            started = self.starts[slot]
            if started and time.time() - started >= timeout:
                raise TimeoutError
            # Not started yet (queued, or workers still starting): poll until its clock starts.
            wait = max(started + timeout - time.time(), 0.01) if started else 0.2
            try:
                return future.result(timeout=wait)
            except _TIMEOUTS:
                continue

    def kill(self) -> None:
        """Kill the worker processes (a hung decoder ignores polite shutdown)."""
        # ProcessPoolExecutor has no public way to do this before Python 3.14 (terminate_workers).
        for process in list((getattr(self.executor, "_processes", None) or {}).values()):
            try:
                process.kill()
            except Exception:  # already gone
                pass
        # The call queue's feeder thread may be blocked writing an item (a job bigger than the pipe's 64 kB) to
        # workers that are now dead; joining it at exit would then hang the interpreter for good.
        queue = getattr(self.executor, "_call_queue", None)
        if queue is not None:
            queue.cancel_join_thread()
        self.shutdown()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _iter_pool(
    items: Iterator[Any], work_fn: Callable, workers: int, prefetch: int, *, start_method: str, timeout: float | None
) -> Iterator[Outcome]:
    context = multiprocessing.get_context(start_method)
    # In-flight items never exceed ``prefetch`` and leave in order, so ``seq % prefetch`` slots never collide.
    starts = context.RawArray("d", prefetch)  # lock-free: a killed worker cannot leave a lock held

    def new_pool(n: int = workers) -> _Pool:
        return _Pool(context, n, starts)

    pool = new_pool()
    # Each entry: [item, Future or finished Outcome, slot]
    pending: collections.deque[list] = collections.deque()
    exhausted, seq = False, 0
    try:
        while True:
            while not exhausted and len(pending) < prefetch:
                try:
                    item = next(items)
                except StopIteration:
                    exhausted = True
                    break
                slot, seq = seq % prefetch, seq + 1
                pending.append([item, pool.submit(work_fn, item, slot), slot])
            if not pending:
                return
            item, state, slot = pending[0]
            if isinstance(state, Future):
                try:
                    state = _outcome(item, pool.wait(state, slot, timeout))
                except _TIMEOUTS:
                    pool.kill()
                    pending[0][1] = Outcome(item=item, error=f"{TIMED_OUT} after {timeout} s")
                    pool = _recover(pool, pending, new_pool, work_fn, timeout)
                    continue
                except BrokenProcessPool:
                    pool = _recover(pool, pending, new_pool, work_fn, timeout)
                    continue
                except Exception as exc:  # e.g. an item or a result that cannot be pickled
                    state = Outcome(item=item, error=f"{type(exc).__name__}: {exc}")
            pending.popleft()
            yield state
    except (KeyboardInterrupt, GeneratorExit):
        # Interrupted (Ctrl-C, SIGTERM) or closed before the end: the in-flight items are not wanted. Killed, not
        # shut down politely: the interpreter's exit would wait for the workers, and after an interrupt that
        # wait was seen to hang for good.
        pool.kill()
        raise
    finally:
        pool.shutdown()


RETRIED = "retried on pydicom's decoding route after its worker died"


def _without_direct(work_fn: Callable[[Any], Any], item: Any) -> Any:
    """``work_fn(item)`` with the direct pixel routes off in this (fresh, single-use) worker: pydicom decodes."""
    pixels.disable_direct()
    return work_fn(item)


def _retry_on_pydicom(solo: _Pool, work_fn: Callable, item: Any, slot: int, *, timeout: float | None,
                      died: BaseException) -> Outcome:
    """An item whose worker died, once more in a fresh worker with every slice decoded by pydicom (the direct
    decoders are C code that a corrupt file might still crash): its outcome says so in ``retried``; when that
    worker dies too (or times out), the item's error says both."""
    try:
        outcome = _outcome(item, solo.wait(solo.submit(functools.partial(_without_direct, work_fn), item, slot), slot,
                                           timeout))
    except _TIMEOUTS:
        solo.kill()
        return Outcome(item=item, error=f"{WORKER_DIED}: {died}; {RETRIED}: {TIMED_OUT} after {timeout} s")
    except BrokenProcessPool:
        return Outcome(item=item, error=f"{WORKER_DIED}: {died}; {RETRIED}: died again")
    except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result: reported for this item only
        return Outcome(item=item, error=f"{WORKER_DIED}: {died}; {RETRIED}: {type(exc).__name__}: {exc}")
    return dataclasses.replace(outcome, retried=f"{RETRIED} ({died})")


def _recover(pool: _Pool, pending: collections.deque, new_pool: Callable, work_fn: Callable,
             timeout: float | None) -> _Pool:
    """After a worker died (or was killed): rerun every unfinished in-flight item alone, in a one-worker
    pool, so that the culprit is found for certain. Items whose future had already finished keep their
    result. Returns a fresh full pool to continue with.
    """
    pool.shutdown()
    solo = new_pool(1)
    for entry in pending:
        item, state, slot = entry
        if isinstance(state, Outcome):
            continue
        if state.done() and not state.cancelled() and state.exception() is None:
            entry[1] = _outcome(item, state.result())
            continue
        try:
            entry[1] = _outcome(item, solo.wait(solo.submit(work_fn, item, slot), slot, timeout))
        except _TIMEOUTS:
            entry[1] = Outcome(item=item, error=f"{TIMED_OUT} after {timeout} s")
            solo.kill()
            solo = new_pool(1)
        except BrokenProcessPool as exc:
            solo.shutdown()
            solo = new_pool(1)
            entry[1] = _retry_on_pydicom(solo, work_fn, item, slot, timeout=timeout, died=exc)
            solo.shutdown()
            solo = new_pool(1)
        except Exception as exc:  # e.g. an item or a result that cannot be pickled
            entry[1] = Outcome(item=item, error=f"{type(exc).__name__}: {exc}")
    solo.shutdown()
    return new_pool()
