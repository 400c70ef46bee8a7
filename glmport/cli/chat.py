"""``glmport chat``: a multi-turn conversation with a model or a training result, in the terminal or a pipe.

::

    glmport chat MODEL_OR_RESULT [--system TEXT] [--tools tools.json [--tool-results results.jsonl]]

Each line you type is a message; the reply is streamed as it is generated. ``/reset`` forgets the
conversation (the system message and tools stay), ``/exit`` (or end of input) ends it. With ``--tools`` the
model may call a tool: the call is shown as ``[tool call] NAME {ARGUMENTS}``, and the next line you type (or
the next entry of ``--tool-results``) is what the tool returned, as JSON or plain text; the model then
continues. When stdin is not a terminal (a script, a pipe) there are no prompts: stdout holds the replies (each
ended by a newline) and tool calls only, and lines are read until the input ends.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from glmport.cli.infer import (
    add_generation_flags,
    add_model_flags,
    configure_logging,
    generation_settings,
    on_backend,
    open_model,
    print_piece,
    report_leaks,
)
from glmport.errors import DataError, Problem, SignalInterrupt

COMMANDS = {"/reset": "forget the conversation (the system message and tools stay)", "/exit": "end the chat",
            "/quit": "end the chat"}


def add_parser(subparsers, common) -> None:
    p = subparsers.add_parser("chat", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="chat with a model folder or a training result (streamed, multi-turn, tools)",
                              description=__doc__.split("\n", 2)[2])
    p.add_argument("model", type=Path, help="model folder, OUTPUT_DIR/final of glmport train, or a peft adapter")
    p.add_argument("--system", default=None, help="the system message")
    p.add_argument("--tools", type=Path, metavar="FILE",
                   help="a JSON array of tools the model may call, OpenAI style ({\"type\": \"function\", "
                        "\"function\": {\"name\", \"description\", \"parameters\"}}) or ChatGLM3 style")
    p.add_argument("--tool-results", type=Path, metavar="FILE",
                   help="JSON lines, {\"result\": VALUE} or {\"name\": TOOL, \"result\": VALUE}: what the tools "
                        "return, one line per call in order (instead of typing it)")
    add_model_flags(p)
    add_generation_flags(p, max_new_tokens=512)
    p.add_argument("-q", "--quiet", action="store_true", help="no log lines on stderr")
    p.set_defaults(handler=cmd_chat)


class ToolResults:
    """The entries of a ``--tool-results`` file, handed out one per tool call, in order."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError("tool results file not found", [Problem("--tool-results", f"no such file: {path}",
                                                                    "give a JSON-lines file")])
        self.entries: list[tuple[str, str | None, object]] = []
        problems = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8-sig").split("\n"), 1):
            if not line.strip():
                continue
            where = f"{self.path}:{number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(Problem(where, f"invalid JSON: {exc.msg} (column {exc.colno})"))
                continue
            if not isinstance(value, dict) or "result" not in value or not isinstance(value.get("name", ""), str):
                problems.append(Problem(where, "expected {\"result\": VALUE} or {\"name\": TOOL, \"result\": VALUE}"))
                continue
            self.entries.append((where, value.get("name"), value["result"]))
        if problems:
            raise DataError(f"{self.path}: {len(problems)} invalid line(s)", problems)
        self.used = 0

    def result_for(self, call):
        if self.used >= len(self.entries):
            raise DataError(f"{self.path}: no result left for tool call {self.used + 1} ({call.name})", [Problem(
                str(self.path), f"the file holds {len(self.entries)} result(s) and the model made another call",
                "add a line for this call")])
        where, name, result = self.entries[self.used]
        self.used += 1
        if name is not None and name != call.name:
            raise DataError(f"{where}: the result is for {name}, but the model called {call.name}", [Problem(
                where, f"tool call {self.used} is {call.describe()}", "put the results in the order of the calls")])
        return result


class Terminal:
    """Lines in, replies out. In a terminal: prompts and a banner; otherwise only the replies and tool calls."""

    def __init__(self, interactive: bool):
        self.interactive = interactive

    def read(self, prompt: str) -> str | None:
        """The next line without its newline; None at the end of the input."""
        if self.interactive:
            try:
                return input(prompt)
            except EOFError:
                sys.stdout.write("\n")
                return None
        line = sys.stdin.readline()
        return None if line == "" else line.rstrip("\r\n")

    def note(self, text: str) -> None:
        """A remark for the person at the terminal (on stderr; silent in scripts)."""
        if self.interactive:
            print(text, file=sys.stderr, flush=True)

    def begin_reply(self) -> None:
        if self.interactive:
            print_piece("assistant> ")


def cmd_chat(args, manager) -> int:
    from glmport.toolcalls import read_tools_file

    configure_logging(args)
    settings = generation_settings(args)
    tools = read_tools_file(args.tools) if args.tools is not None else None  # before the model loads
    results = ToolResults(args.tool_results) if args.tool_results is not None else None
    return on_backend(args, manager, lambda backend: _chat(args, manager, backend, settings, tools, results))


def _chat(args, manager, backend, settings, tools, results) -> int:
    from glmport.chat import ChatSession
    from glmport.train.guarded import guard_mode_for

    bundle = open_model(args, manager, backend, args.model)
    try:
        session = ChatSession(bundle, settings, system=args.system, tools=tools,
                              guard_mode=guard_mode_for(args.guard_64bit, backend))
        terminal = Terminal(interactive=sys.stdin.isatty())
        terminal.note(f"glmport chat: {bundle.description} on {backend.name}"
                      + (f", tools: {', '.join(session.tool_names)}" if tools else "")
                      + ". /reset starts over, /exit ends.")
        _converse(session, terminal, results)
    finally:
        report_leaks(bundle)
        bundle.close()
    return 0


def _converse(session, terminal: Terminal, results: ToolResults | None) -> None:
    while True:
        line = terminal.read("you> ")
        if line is None or line.strip() in ("/exit", "/quit"):
            return
        if not line.strip():
            continue
        if line.strip() == "/reset":
            session.reset()
            terminal.note("(the conversation starts over)")
            continue
        reply = _answer(terminal, lambda on_text, text=line: session.ask(text, on_text))
        while reply is not None and reply.tool_call is not None:
            call = reply.tool_call
            _show_call(session, call)
            if results is not None:
                result = results.result_for(call)
            else:
                answer = terminal.read(f"result of {call.name}> ")
                if answer is None or answer.strip() in ("/exit", "/quit"):
                    return
                if answer.strip() == "/reset":
                    session.reset()
                    terminal.note("(the conversation starts over)")
                    break
                result = _as_value(answer)
            reply = _answer(terminal, lambda on_text, value=result: session.observe(value, on_text))


def _answer(terminal: Terminal, turn):
    """Run one model turn, its text streamed; in a terminal Ctrl-C stops the reply, not the chat."""
    terminal.begin_reply()
    try:
        reply = turn(print_piece)
    except KeyboardInterrupt as exc:
        if isinstance(exc, SignalInterrupt) or not terminal.interactive:
            raise
        print_piece("\n")
        terminal.note("(reply interrupted; it is not part of the conversation)")
        return None
    if reply.text or reply.tool_call is None:
        print_piece("\n")
    return reply


def _show_call(session, call) -> None:
    print_piece(f"[tool call] {call.describe()}\n")
    if call.error:
        print(f"glmport: the model's call of {call.name} has no readable arguments ({call.error})",
              file=sys.stderr, flush=True)
    if session.tool_names and call.name not in session.tool_names:
        print(f"glmport: the model called {call.name}, which is not among the tools "
              f"({', '.join(session.tool_names)})", file=sys.stderr, flush=True)


def _as_value(text: str):
    """A typed tool result: JSON when it parses as JSON, else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
