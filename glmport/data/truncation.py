"""Fitting a rendered conversation into the training budget without ever losing the answer.

Upstream cuts the tail of the whole token stream, which can cut away every target of a sample (its
loss is then 0 or NaN). Here the last learned message (the answer) is protected, and the sample is
shortened in this order:

1. messages after the answer go (they are continuation; the token that followed the answer stays,
   because it is the answer's stop target);
2. whole earlier turns go, oldest first (the system message and the turn that holds the answer stay);
3. prompt content is trimmed from its start, keeping the part nearest the answer (system text last);
4. only then is the answer's content cut from its end, keeping at least one token and the stop target.

Steps 2-3 stop once the prompt is within ``max_input_length`` when the answer itself is over its own
share (``max_output_length + 1``): a long answer is cut rather than stripped of all its context.
"""

from __future__ import annotations

from glmport.data.spans import Rendered
from glmport.errors import DataError, Problem


def fit_to_budget(rendered: Rendered, budget: int, max_input_length: int, source: str) -> int:
    """Shorten ``rendered`` in place to at most ``budget`` tokens; return how many messages were dropped."""
    if len(rendered) <= budget:
        return 0
    dropped = _drop_after_answer(rendered)
    shortest_answer = _shortest_answer_length(rendered)
    prompt_goal = max(budget - rendered.answer_length(), max_input_length)
    dropped += _shrink_prompt(rendered, min(prompt_goal, budget - shortest_answer))
    if len(rendered) > budget:
        _cut_answer(rendered, budget, source)
    return dropped


def _drop_after_answer(rendered: Rendered) -> int:
    tail = rendered.spans[rendered.answer + 1:]
    stop = next((span.ids[:1] for span in tail if span.ids), rendered.suffix)
    rendered.spans = rendered.spans[: rendered.answer + 1]
    rendered.suffix = stop
    return len(tail)


def _shortest_answer_length(rendered: Rendered) -> int:
    answer = rendered.spans[rendered.answer]
    return len(answer.head) + min(1, len(answer.content)) + len(rendered.suffix)


def _shrink_prompt(rendered: Rendered, goal: int) -> int:
    dropped = 0
    for turn in _earlier_turns(rendered):
        if rendered.prompt_length() <= goal:
            break
        for index in reversed(turn):  # from the back, so the indexes before stay valid
            del rendered.spans[index]
        rendered.answer -= len(turn)
        dropped += len(turn)
    for index in _trimmable(rendered):
        excess = rendered.prompt_length() - goal
        if excess <= 0:
            break
        span = rendered.spans[index]
        # A rebuilt message (head + content) can be a token longer than the one-piece rendering of GLM-4
        # when the tokenizer merged across the newline; cut that much more.
        cut = excess + len(span.head) + len(span.content) - len(span.ids)
        rendered.spans[index] = span.with_content(span.content[min(max(cut, 0), len(span.content)):])
    return dropped


def _earlier_turns(rendered: Rendered) -> list[list[int]]:
    """Indexes of the droppable messages, grouped into turns (a user message and what follows it),
    oldest first. The system message and the last turn before the answer are not droppable."""
    before = rendered.spans[: rendered.answer]
    users = [i for i, span in enumerate(before) if span.role == "user"]
    protected_from = users[-1] if users else len(before)
    turns: list[list[int]] = []
    for index in range(protected_from):
        if before[index].role == "system":
            continue
        if not turns or before[index].role == "user":
            turns.append([])
        turns[-1].append(index)
    # Dropping turn k shifts the later indexes by the lengths of the turns before it.
    shifted, removed = [], 0
    for turn in turns:
        shifted.append([index - removed for index in turn])
        removed += len(turn)
    return shifted


def _trimmable(rendered: Rendered) -> list[int]:
    """Prompt messages whose content may be trimmed: those the model does not learn, oldest first,
    the system message last (it carries the instructions and tools)."""
    candidates = [i for i, span in enumerate(rendered.spans[: rendered.answer]) if not span.learn and span.content]
    return sorted(candidates, key=lambda i: rendered.spans[i].role == "system")


def _cut_answer(rendered: Rendered, budget: int, source: str) -> None:
    answer = rendered.spans[rendered.answer]
    others = len(rendered) - len(answer.ids)
    keep = budget - others - len(answer.head)
    if keep < 1:
        needed = others + len(answer.head) + 1
        raise DataError(f"{source}: the sample cannot fit the token budget", [Problem(
            source,
            f"even with the history dropped, the prompt emptied and the answer cut to one token this sample "
            f"needs {needed} tokens; the budget is max_input_length + max_output_length + 1 = {budget}",
            "raise max_input_length or max_output_length",
        )])
    rendered.spans[rendered.answer] = answer.with_content(answer.content[:keep])
