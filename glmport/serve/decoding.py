"""OpenAI's ``stop`` sequences over a reply that is streamed piece by piece.

The pieces come from :class:`glmport.infer.ReplyStream` (the reply's text as :func:`glmport.infer.read_reply`
reads it: the answer, never a tool call's raw text). A stop sequence ends the reply where it begins and is
not part of it, as OpenAI has it. Whatever could still turn out to be the start of a stop sequence is held
back until the next piece decides, so that nothing sent ever has to be taken back: the pieces sent add up to
:meth:`StopSequences.cut` of the final text.
"""

from __future__ import annotations

from collections.abc import Callable


class StopSequences:
    """Feed it the reply's pieces with :meth:`feed`; it calls ``send`` with what may go to the client and
    sets :attr:`hit` when a stop sequence has ended the reply (generation should stop)."""

    def __init__(self, stops: list[str], send: Callable[[str], None]):
        self.stops = [stop for stop in stops if stop]
        self.send = send
        self.text = ""  # everything fed so far, cut at a stop sequence
        self.sent = 0  # how much of ``text`` went to ``send``
        self.hit = False

    def feed(self, piece: str) -> None:
        if self.hit or not piece:
            return
        self.text += piece
        cut = self._first_stop(self.text)
        if cut is not None:
            self.text = self.text[:cut]
            self.hit = True
            ready = len(self.text)
        else:
            ready = len(self.text) - self._stop_prefix_length(self.text)
        if ready > self.sent:
            self.send(self.text[self.sent:ready])
            self.sent = ready

    def cut(self, text: str) -> str:
        """``text`` up to its first stop sequence."""
        at = self._first_stop(text)
        return text if at is None else text[:at]

    def rest(self, final: str) -> str:
        """What is left to send of the reply's final text (already cut), once the reply is over."""
        sent = self.text[: self.sent]
        return final[len(sent):] if final.startswith(sent) else ""

    def _first_stop(self, text: str) -> int | None:
        found = [at for at in (text.find(stop) for stop in self.stops) if at >= 0]
        return min(found) if found else None

    def _stop_prefix_length(self, text: str) -> int:
        """How much of the end of ``text`` could be the start of a stop sequence."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
