"""The generation thread: requests wait in a bounded queue and are generated one at a time, in order.

Why one at a time, without batching concurrent requests: a reply must not depend on which other requests
happened to arrive with it. Batched generation pads prompts to a common length (the ChatGLM3 remote code
then builds different masks and position ids), shares one random stream between requests (a ``seed``
would no longer reproduce a reply) and gives every member of a batch the sampling settings and stop
rules of one request. On the CPUs and single accelerators this server is for, one-at-a-time keeps every
reply exactly what ``glmport infer`` gives for the same prompt; production throughput is vLLM's job
(README, "Serving"). A request that waits is cheap: the queue is bounded (:class:`QueueFull`, 429) and a
request that waits too long gives up (503, decided by the caller).

Each job talks to its request through an asyncio queue of events (``started``, ``delta``, ``done``,
``error``) filled from this thread with ``call_soon_threadsafe``. Cancelling a job (the client went
away) removes it from the queue, or stops its generation at the next token through a stopping criterion
that reads the job's flag: the slot is free again within one forward pass.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass
from typing import Any

from glmport.serve.decoding import StopSequences

log = logging.getLogger("glmport")


class QueueFull(Exception):
    """The bounded queue has no room (the caller answers 429)."""


@dataclass
class Outcome:
    """How a generation ended. ``reply`` is :func:`glmport.infer.read_reply` of the generated ids; ``text``
    is its answer cut at a stop sequence (what the streamed pieces add up to)."""

    reply: Any  # glmport.infer.Reply
    text: str
    stopped_by_sequence: bool
    prompt_tokens: int
    completion_tokens: int

    @property
    def finish_reason(self) -> str:
        return "stop" if self.stopped_by_sequence or self.reply.stop is not None else "length"


class Job:
    """One request's generation: its inputs, its cancel flag, and the events it receives."""

    def __init__(self, model: str, prompt_ids: list[int], settings, stop: list[str], *,
                 loop: asyncio.AbstractEventLoop):
        self.model = model
        self.prompt_ids = prompt_ids
        self.settings = settings  # glmport.infer.GenerationSettings
        self.stop = stop
        self.cancelled = threading.Event()
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = loop

    def emit(self, kind: str, value=None) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.cancelled.set()


class Worker:
    """The thread that owns the model. ``max_waiting``: requests that may wait besides the running one."""

    def __init__(self, models, *, max_waiting: int, guard_mode: str | None):
        self.models = models
        self.max_waiting = max_waiting
        self.guard_mode = guard_mode
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self._running: Job | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="glmport-generate", daemon=True)
        self.served = 0
        self.failed = 0
        self.guard_leaks: set[str] = set()  # with --guard-64bit report: every leak seen, logged once

    # --- the request side (event loop thread) ---------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel everything and wait for the thread (the running generation stops at its next token)."""
        with self._lock:
            self._stopping = True
            for job in self._waiting:
                job.cancelled.set()
            self._waiting.clear()
            if self._running is not None:
                self._running.cancelled.set()
            self._lock.notify_all()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_waiting})")
            self._waiting.append(job)
            self._lock.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone or gave up: drop the job, or stop its generation at the next token."""
        job.cancelled.set()
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)

    def stats(self) -> dict:
        with self._lock:
            return {"waiting": len(self._waiting), "running": self._running is not None,
                    "max_waiting": self.max_waiting, "served": self.served, "failed": self.failed,
                    "guard_leaks": len(self.guard_leaks)}

    # --- the generation side (this thread) -----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                job = self._waiting.popleft()
                self._running = job
            try:
                if not job.cancelled.is_set():
                    self._serve(job)
            finally:
                with self._lock:
                    self._running = None

    def _serve(self, job: Job) -> None:
        job.emit("started", len(job.prompt_ids))
        try:
            outcome = self._generate(job)
        except Exception as exc:  # a failed generation answers its own request; the server goes on
            self.failed += 1
            log.exception("generation failed for a request to %s", job.model)
            job.emit("error", exc)
            return
        self.served += 1
        if not job.cancelled.is_set():
            job.emit("done", outcome)

    def _guard_report(self, report) -> None:
        """``--guard-64bit report``: a leak is logged the first time it is seen, and counted in /health."""
        for leak in report.leaks:
            if str(leak) not in self.guard_leaks:
                self.guard_leaks.add(str(leak))
                log.warning("64-bit guard: %s", leak)

    def _generate(self, job: Job) -> Outcome:
        """One prompt through transformers' ``generate``, as :func:`glmport.infer.generate_ids` runs it (its
        generation config, the prompt narrowed before it is moved, every forward through the backend and the
        64-bit guard), with two additions a server needs: a stopping criterion that ends generation when the
        client is gone or a stop sequence appeared, and the text streamed through the stop sequences."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        from glmport.infer import ReplyStream, generation_config, read_reply
        from glmport.train.guarded import guarded_forward

        bundle = self.models.bundle
        stops = StopSequences(job.stop, lambda piece: job.emit("delta", piece))
        stream = ReplyStream(bundle, stops.feed)

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                done = job.cancelled.is_set() or stops.hit
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        batch = bundle.backend.coerce({"input_ids": torch.tensor([job.prompt_ids])})  # narrowed before it is moved
        input_ids = batch["input_ids"].to(bundle.backend.device(0))
        if job.settings.seed is not None:
            bundle.backend.seed(job.settings.seed)
        with torch.no_grad(), self.models.selected(job.model) as model, \
                guarded_forward(model, bundle.backend, self.guard_mode, self._guard_report):
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                           generation_config=generation_config(bundle, job.settings), streamer=stream,
                           stopping_criteria=StoppingCriteriaList([Stop()]))
        reply = read_reply(bundle, stream.ids)
        text = stops.cut(reply.text)
        if not job.cancelled.is_set():
            rest = stops.rest(text)
            if rest:
                job.emit("delta", rest)
        return Outcome(reply, text, stops.hit, len(job.prompt_ids), len(stream.ids))
