"""A conversation as token spans, one per message: what templates build and truncation shortens."""

from __future__ import annotations

from dataclasses import dataclass, replace

IGNORE_INDEX = -100  # the label of a position that carries no loss


@dataclass
class Span:
    """One message as tokens, with the pieces truncation needs to rebuild it shorter."""

    role: str
    ids: list[int]  # exactly as the template renders the message ([] when it renders nothing)
    head: list[int]  # role token + metadata line: what stays when the content is cut away
    content: list[int]  # the content alone
    learn: bool  # the message's tokens are targets (before the one-token shift)
    learn_role: bool  # ... and so is its role token (False for GLM-4 combine mode's last reply)

    def mask(self) -> list[bool]:
        return [self.learn_role] + [self.learn] * (len(self.ids) - 1) if self.ids else []

    def with_content(self, content: list[int]) -> Span:
        """The message rebuilt around a shortened content (head kept whole)."""
        return replace(self, ids=self.head + content, content=content)


@dataclass
class Rendered:
    """prefix ([gMASK] sop) + the messages + suffix (the closing stop token); ``answer`` indexes the
    message truncation protects: the last one the model learns."""

    prefix: list[int]
    spans: list[Span]
    suffix: list[int]
    answer: int

    def __len__(self) -> int:
        return len(self.prefix) + sum(len(s.ids) for s in self.spans) + len(self.suffix)

    def prompt_length(self) -> int:
        return len(self.prefix) + sum(len(s.ids) for s in self.spans[: self.answer])

    def answer_length(self) -> int:
        return len(self) - self.prompt_length()

    def flatten(self) -> tuple[list[int], list[bool]]:
        ids, mask = list(self.prefix), [False] * len(self.prefix)
        for span in self.spans:
            ids += span.ids
            mask += span.mask()
        return ids + self.suffix, mask + [False] * len(self.suffix)


def shifted_labels(ids: list[int], mask: list[bool]) -> list[int]:
    """Labels under the one-token right shift of the upstream recipes.

    A position is a target when the token BEFORE it belongs to a learned message: the role token
    opening a reply is not a target (the prompt already ends with it), while the token after the
    reply (the next role token, or the closing eos) is, so the model learns to stop.
    """
    shifted = [False, *mask[:-1]]
    return [token if learned else IGNORE_INDEX for token, learned in zip(ids, shifted)]
