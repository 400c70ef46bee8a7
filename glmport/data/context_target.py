"""The data format of the ChatGLM-6B tuning tutorial (mymusise/ChatGLM-Tuning): ``{"context", "target"}`` records.

Training reads them like any format (``glmport.data.formats``: the context is the question, the target the
answer), and the ``chatglm`` template gives them the tutorial's layout. This module writes them
(``glmport data convert IN OUT --to context-target``):

* an alpaca record (``instruction``, ``input``, ``output``) becomes what the tutorial's
  ``cover_alpaca2jsonl.py`` makes of it: context ``"Instruction: {instruction}\\n"``, then ``"Input: {input}\\n"``
  when there is an input, then ``"Answer: "``; target the output;
* a conversation in any other format becomes ChatGLM-6B's own prompt for its last learned reply (the
  ``[Round N]`` text of ``model.chat``, the system text first) and that reply: trained with the ``chatglm``
  template, the converted record gives the same tokens and labels as the conversation it came from.

What one context and one target cannot hold (tool turns; an alpaca record's ``history`` or ``system``,
which the tutorial's converter drops) is an error naming the record.
"""

from __future__ import annotations

from glmport.data.records import Conversation, learned_by_default
from glmport.errors import DataError, Problem

FORMAT = "context-target"


def alpaca_context(instruction: str, extra: str) -> str:
    """The tutorial's prompt for an instruction and its optional input."""
    return f"Instruction: {instruction}\n" + (f"Input: {extra}\n" if extra else "") + "Answer: "


def to_context_target_record(conv: Conversation, fmt: str) -> dict:
    """The ``{"context", "target"}`` record of ``conv``, read from a file of format ``fmt``."""
    from glmport.data.templates import chatglm6b_dialogue, chatglm6b_prompt

    record = conv.record if isinstance(conv.record, dict) else {}
    if fmt == FORMAT:
        return {"context": record["context"], "target": record["target"]}
    if fmt == "alpaca":
        dropped = [key for key in ("history", "system") if record.get(key)]
        if dropped:
            raise DataError(f"{conv.source}: the context/target format holds one instruction and its answer",
                            [Problem(conv.source, f"the record has {' and '.join(dropped)}, which the tutorial's "
                                                  "converter would drop",
                                     "convert to ChatGLM3 conversations instead (--to conversations), which keep them")])
        return {"context": alpaca_context(record["instruction"], record.get("input") or ""), "target": record["output"]}
    system, rounds, _ = chatglm6b_dialogue(conv.messages, conv.source)
    learned = [index for index, (_, answer) in enumerate(rounds) if learned_by_default(answer)]
    if not learned:
        raise DataError(f"{conv.source}: nothing to learn", [Problem(
            conv.source, "no assistant message carries loss", "give the conversation an answer to learn")])
    history = [(question, answer.content) for question, answer in rounds[: learned[-1]]]
    question, answer = rounds[learned[-1]]
    return {"context": chatglm6b_prompt(system, history, question), "target": answer.content}
