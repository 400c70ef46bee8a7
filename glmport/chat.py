"""A multi-turn conversation with a loaded model: the history, tools, tool calls and their results.

:class:`ChatSession` keeps the conversation as :class:`glmport.data.records.Message` objects and asks the model
for each reply through :func:`glmport.infer.generate_reply`, so every turn is rendered by the family's template
exactly as it was trained: a tool call stays in the history as the model wrote it (the tool's name on the
metadata line), the tool's result follows as an ``observation`` message, and the tools are declared on the
system message the family's way (:func:`glmport.toolcalls.tools_message`). The terminal loop around it is
``glmport chat`` (:mod:`glmport.cli.chat`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from glmport.data.records import Message
from glmport.errors import ConfigError, Problem
from glmport.infer import GenerationSettings, InferenceModel, Reply, generate_reply
from glmport.toolcalls import observation_message, tool_names, tools_message

log = logging.getLogger("glmport")


class ChatSession:
    def __init__(self, bundle: InferenceModel, settings: GenerationSettings, *, system: str | None = None,
                 tools: list[dict] | None = None, guard_mode: str | None = None):
        self.bundle = bundle
        self.settings = settings
        self.guard_mode = guard_mode
        self.tools = tools or []
        if self.tools and not bundle.template.tool_format:
            raise ConfigError(f"the {bundle.family} family has no tool format", [Problem(
                "--tools", f"{bundle.description} writes plain answers: it cannot call tools",
                "leave out --tools, or chat with a ChatGLM3 / GLM-4 model")])
        if self.tools:
            self.opening = [tools_message(bundle.template.tool_format, self.tools, system)]
        else:
            self.opening = [Message("system", system)] if system else []
        self.history: list[Message] = []

    @property
    def tool_names(self) -> list[str]:
        return tool_names(self.tools)

    def reset(self) -> None:
        """Forget the conversation; the system message and the tools stay."""
        self.history = []

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """The user says ``text``; the model's reply (streamed through ``on_text``) joins the history."""
        return self._turn(Message("user", text), on_text)

    def observe(self, result: Any, on_text: Callable[[str], None] | None = None) -> Reply:
        """A tool returned ``result`` (text, or any JSON value) for the model's last call; the model goes on."""
        return self._turn(observation_message(result), on_text)

    def _turn(self, message: Message, on_text) -> Reply:
        self.history.append(message)
        try:
            reply = generate_reply(self.bundle, self._fitting(), self.settings, guard_mode=self.guard_mode,
                                   on_text=on_text)
        except BaseException:
            self.history.pop()  # the turn did not happen (Ctrl-C while generating): the user may try again
            raise
        self.history.extend(reply.messages)
        return reply

    def _fitting(self) -> list[Message]:
        """The conversation, its oldest turns dropped while the prompt and the reply would not fit the model.
        A turn starts with a user message, so a reply or a tool's result never loses what it answers; the
        current turn is always kept whole."""
        limit = self.bundle.context_length()
        messages = self.opening + self.history
        if limit is None:
            return messages
        budget = limit - self.settings.max_new_tokens
        starts = [i for i, message in enumerate(self.history) if message.role == "user" and i > 0]
        dropped = 0
        while starts and len(self.bundle.template.prompt_ids(messages)) > budget:
            dropped = starts.pop(0)
            messages = self.opening + self.history[dropped:]
        if dropped:
            log.warning("the conversation is longer than the model's %d positions: the oldest %d message(s) are "
                        "left out of the prompt (/reset starts over)", limit, dropped)
        return messages
