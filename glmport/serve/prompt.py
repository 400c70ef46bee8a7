"""An OpenAI conversation as the family's prompt, and the model's reply as an OpenAI message.

Requests use OpenAI's roles and tool shapes; the model sees its own family's (:mod:`glmport.toolcalls`): the
``tools`` of a request are declared on the system message the family's way, an assistant message's
``tool_calls`` are written back as the family's call turns, and ``tool`` messages become observations. A
reply that calls a tool comes back as ``tool_calls`` with JSON arguments; one whose call cannot be read
(the model wrote no arguments glmport can parse) comes back as the text the model wrote, never as an error.
"""

from __future__ import annotations

from glmport.data.records import Message
from glmport.serve.protocol import ChatRequest, assistant_message, bad_request, tool_call_id


def prompt_messages(request: ChatRequest, template) -> list[Message]:
    """The request's conversation as glmport messages, ready for ``template.prompt_ids``."""
    from glmport.toolcalls import format_tool_call, observation_message, tools_message

    family = template.tool_format
    uses_tools = bool(request.tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in request.messages)
    if uses_tools and family is None:
        raise bad_request(f"tools: the {template.name} family has no tool format, so its models cannot call tools",
                          param="tools")
    messages: list[Message] = []
    declared = not request.tools
    for index, item in enumerate(request.messages):
        role, content = item["role"], item.get("content")
        if role == "system" and not declared:
            messages.append(tools_message(family, request.tools, content))
            declared = True
        elif role == "tool":
            messages.append(observation_message(content))
        elif role == "assistant":
            if content and content.strip():
                messages.append(Message("assistant", content))
            for number, call in enumerate(item.get("tool_calls") or []):
                function = call["function"]
                try:
                    messages.append(format_tool_call(family, function["name"], function["arguments"]))
                except ValueError as exc:
                    where = f"messages[{index}].tool_calls[{number}].function.arguments"
                    raise bad_request(f"{where}: {exc}", param=where) from None
        else:
            messages.append(Message(role, content))
    if not declared:  # tools and no system message: the family's own tool preamble leads
        messages.insert(0, tools_message(family, request.tools))
    return messages


def reply_message(outcome, template, tools_offered: bool) -> tuple[dict, str, str]:
    """(OpenAI message, finish_reason, its text) for a finished generation (:class:`glmport.serve.worker.Outcome`).

    A call the model made is ``tool_calls`` when the request offered tools and its arguments could be read;
    otherwise what the model wrote (the tool's name line and the call) is returned as text."""
    call = outcome.reply.tool_call
    if call is not None and tools_offered and call.arguments is not None and not outcome.stopped_by_sequence:
        message = assistant_message(outcome.text or None, [call.to_openai(tool_call_id())])
        return message, "tool_calls", outcome.text
    text = outcome.text
    if call is not None:
        written = f"{call.name}\n{call.content.strip()}"
        text = f"{text}\n{written}" if text else written
    return assistant_message(text, None), outcome.finish_reason, text
