"""The thread that owns the model: it admits waiting requests into free rows and steps the running batch."""

from __future__ import annotations

import collections
import logging
import threading
import time

from baize_exp import cpu
from baize_exp.serve.engine import DecodeEngine, GenRequest

log = logging.getLogger("baize_exp.serve")


class QueueFull(RuntimeError):
    """More requests are waiting than `queue_size` allows."""


class BatchWorker:
    """One thread owns the model: it admits waiting requests into free rows and steps the running batch."""

    def __init__(self, engine: DecodeEngine, max_batch: int = 16, max_wait_ms: float = 5.0, queue_size: int = 256):
        self.engine, self.max_batch, self.max_wait = engine, max_batch, max_wait_ms / 1000
        self.queue_size = queue_size
        self.waiting: collections.deque[GenRequest] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True, name="batch-worker")
        self.thread.start()

    def submit(self, req: GenRequest) -> None:
        with self.cond:
            if len(self.waiting) >= self.queue_size:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (serve.queue_size)")
            self.waiting.append(req)
            self.cond.notify()

    def stats(self) -> dict:
        e = self.engine
        return {
            "active_rows": len(e.rows),
            "waiting": len(self.waiting),
            "decode_steps": e.decode_steps,
            "prefills": e.prefills,
            "peak_rows": e.peak_rows,
        }

    def stop(self, timeout: float = 60.0) -> None:
        """Finish what is in the batch and waiting, then end the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=timeout)

    def _admit(self) -> list[GenRequest]:
        free = self.max_batch - len(self.engine.rows)
        admitted = []
        with self.cond:
            if any(r.cancelled for r in self.waiting):  # timed out or gone while waiting: not worth a row
                self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
            while self.waiting and self.waiting[0].n <= free:  # first come, first served: no overtaking
                admitted.append(self.waiting.popleft())
                free -= admitted[-1].n
        return admitted

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.engine.rows:
                    if self.stopping:
                        return
                    self.cond.wait()
            if not self.engine.rows and len(self.waiting) < self.max_batch:
                time.sleep(self.max_wait)  # an idle server lets a burst arrive, then prefills it together
            admitted: list[GenRequest] = []
            cpu.fit_threads()  # this thread does the torch work: it takes the cores free now (re-read every 2 s)
            try:
                admitted = self._admit()
                if admitted:
                    self.engine.add(admitted)
                    self._report()
                if self.engine.rows:
                    self.engine.step()
                    self._report()
            except Exception as e:  # a failed forward fails the requests in the batch, not the server
                log.exception("decode step failed")
                failed = {id(r.req): r.req for r in self.engine.rows}
                failed.update({id(r): r for r in admitted if id(r) not in failed})
                self.engine.rows, self.engine.cache, self.engine.mask = [], None, None
                for req in failed.values():
                    req.emit(("error", None, f"{type(e).__name__}: {e}"))

    def _report(self) -> None:
        """Send streamed text for the live rows, and the final answer of the rows that finished."""
        e = self.engine
        for row in e.rows:
            if row.req.stream and row.finish is None and not row.req.cancelled:
                delta, lps = e.stream_delta(row)
                if delta:
                    row.req.emit(("delta", row.index, delta, lps))
        for row in e.drop_finished():
            if not row.req.cancelled:
                # a streamed answer also gets what was held back: the final text minus what was already sent
                final = e.final_choice(row)
                row.req.emit(
                    ("done", row.index, final, final.text[row.streamed_chars :], row.logprobs[row.streamed_logprobs :])
                )
