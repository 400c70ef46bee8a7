"""``glmport infer``: generate with a base model or a training result, on any backend.

::

    glmport infer MODEL_OR_RESULT --prompt TEXT [--system TEXT]       # the reply, streamed as it is generated
    glmport infer MODEL_OR_RESULT --file prompts.jsonl [-o replies.jsonl] [--batch-size 8]

The flags shared with ``glmport chat`` and ``glmport eval`` (the model, its base, dtype, the 64-bit guard,
generation) are defined here once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from glmport.cli.train import add_remote_code_flags
from glmport.errors import ConfigError, GlmportError, Problem


def add_parser(subparsers, common) -> None:
    p = subparsers.add_parser("infer", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="generate replies with a model folder or a training result (streamed, or a "
                                   "file of prompts in batches)",
                              description=__doc__.split("\n", 2)[2].split("The flags")[0])
    p.add_argument("model", type=Path, help="model folder, OUTPUT_DIR/final of glmport train, or a peft adapter")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the user message")
    source.add_argument("--file", type=Path, metavar="FILE",
                        help="JSON lines of prompts: a string, {\"prompt\", \"system\", \"history\", \"tools\"} or "
                             "{\"messages\": [...]}; each comes back with \"reply\" added")
    p.add_argument("--system", default=None, help="a system message (with --prompt)")
    p.add_argument("-o", "--output", type=Path, metavar="FILE",
                   help="with --file: write the replies here (complete or not at all) instead of to stdout")
    p.add_argument("--batch-size", type=int, default=8, help="with --file: prompts per generate call (default 8)")
    p.add_argument("--no-stream", action="store_true", help="print the reply when it is complete")
    p.add_argument("--json", action="store_true", help="print the reply, model, backend and patches as JSON")
    add_model_flags(p)
    add_generation_flags(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no log lines or progress bar on stderr")
    p.set_defaults(handler=cmd_infer)


# --- shared by infer, chat and eval --------------------------------------------------------------------------

def add_model_flags(p) -> None:
    p.add_argument("--base", type=Path, metavar="DIR",
                   help="the base model folder of an adapter, when it is no longer where the adapter was trained "
                        "(adapter_config.json pins that path)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="weights dtype (auto: the backend's best half precision, fp32 on the CPU)")
    p.add_argument("--guard-64bit", choices=["auto", "on", "off", "report"], default="auto",
                   help="the 64-bit guard around every forward (auto: on for emulated 32-bit devices)")
    add_remote_code_flags(p, config_keys=False)


def add_generation_flags(p, max_new_tokens: int | None = 256) -> None:
    g = p.add_argument_group("generation (greedy unless --temperature is above 0)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"longest reply in tokens (default {max_new_tokens})" if max_new_tokens else
                   "longest reply in tokens (default: the training run's generation_config.max_new_tokens, else "
                   "--max-output-length)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily; above 0 samples")
    g.add_argument("--top-p", type=float, default=0.8, help="nucleus sampling (default 0.8, as the GLM demos)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (default 0: off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1 discourages repeats (default 1.0)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling: the same seed gives the same reply")


def generation_settings(args, max_new_tokens: int | None = None):
    """The generation flags, checked together (one error lists every bad one)."""
    from glmport.infer import GenerationSettings

    settings = GenerationSettings(
        max_new_tokens=max_new_tokens if max_new_tokens is not None else args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, seed=args.seed)
    problems = []
    if settings.max_new_tokens < 1:
        problems.append(Problem("--max-new-tokens", f"{settings.max_new_tokens}: generates nothing", "give 1 or more"))
    if settings.temperature < 0:
        problems.append(Problem("--temperature", f"{settings.temperature} is negative", "0 for greedy, above 0 samples"))
    if not 0 < settings.top_p <= 1:
        problems.append(Problem("--top-p", f"{settings.top_p} is not in (0, 1]", "e.g. 0.8"))
    if settings.top_k < 0:
        problems.append(Problem("--top-k", f"{settings.top_k} is negative", "0 turns it off"))
    if settings.repetition_penalty <= 0:
        problems.append(Problem("--repetition-penalty", f"{settings.repetition_penalty} is not positive",
                                "1.0 is no penalty"))
    if getattr(args, "batch_size", 1) < 1:
        problems.append(Problem("--batch-size", f"{args.batch_size}", "give 1 or more"))
    if problems:
        raise ConfigError(f"{len(problems)} bad generation flag(s)", problems)
    return settings


def configure_logging(args) -> None:
    """Log lines (what is loaded, from where, which code runs) go to stderr: stdout is the command's output."""
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="[glmport] %(message)s")
    if quiet:  # transformers' own notices and weight-loading bars too
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


def on_backend(args, manager, work):
    """``work(backend)`` with the selected backend active (an emulated device installed only meanwhile)."""
    from glmport.backend import select_backend

    backend = select_backend(manager.backends, args.backend).backend
    with backend.activate():
        return work(backend)


def open_model(args, manager, backend, path: Path):
    from glmport.infer import load_for_inference
    from glmport.modeling import RemoteCodeConsent

    consent = RemoteCodeConsent(trust=args.trust_remote_code, allow_unverified=args.allow_unverified_patches)
    return load_for_inference(path, backend, patch_sets=manager.patch_sets, consent=consent, dtype=args.dtype,
                              base=args.base)


def write_output(path: Path, text: str, what: str) -> None:
    """``text`` into ``path`` complete or not at all; a failed write is one clear error (exit 2)."""
    from glmport.data.loader import write_text_atomically

    try:
        write_text_atomically(Path(path), text)
    except OSError as exc:
        raise GlmportError(f"cannot write {what} to {path}: {exc.strerror or exc}", [Problem(
            str(path), "nothing was written", "choose a folder you can write to, with free space")]) from None


def progress_bar(args, total: int, unit: str, desc: str | None = None):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, disable=getattr(args, "quiet", False),
                dynamic_ncols=True)


def report_leaks(bundle) -> None:
    """With ``--guard-64bit report``: every distinct place a 64-bit tensor reached a compute op."""
    for leak in bundle.guard.leaks:
        logging.getLogger("glmport").warning("64-bit guard: %s", leak)


def tool_call_json(call) -> dict | None:
    if call is None:
        return None
    shown = {"name": call.name, "arguments": call.arguments}
    if call.error:
        shown.update(content=call.content, error=call.error)
    return shown


def print_piece(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# --- glmport infer ------------------------------------------------------------------------------------------

def cmd_infer(args, manager) -> int:
    configure_logging(args)
    settings = generation_settings(args)
    if args.output is not None and args.file is None:
        raise ConfigError("-o/--output goes with --file", [Problem("--output", "--prompt prints its reply",
                                                                   "redirect stdout, or use --file")])
    if args.file is not None:
        from glmport.infer import read_prompt_file

        read_prompt_file(args.file, None)  # every line checked before the model loads
    return on_backend(args, manager, lambda backend: _infer(args, manager, backend, settings))


def _infer(args, manager, backend, settings) -> int:
    from glmport.train.guarded import guard_mode_for

    bundle = open_model(args, manager, backend, args.model)
    guard = guard_mode_for(args.guard_64bit, backend)
    try:
        if args.file is not None:
            return _infer_file(args, bundle, settings, guard)
        return _infer_prompt(args, bundle, settings, guard)
    finally:  # the foreign code as it was: an in-process caller may load another model after this one
        report_leaks(bundle)
        bundle.close()


def _infer_prompt(args, bundle, settings, guard) -> int:
    from glmport.data.records import Message
    from glmport.infer import check_context, generate_reply

    messages = ([Message("system", args.system)] if args.system else []) + [Message("user", args.prompt)]
    check_context(bundle, [("--prompt", bundle.template.prompt_ids(messages))], settings.max_new_tokens)
    streaming = not (args.json or args.no_stream)
    reply = generate_reply(bundle, messages, settings, guard_mode=guard, on_text=print_piece if streaming else None)
    if args.json:
        patches = bundle.loaded.patches
        print(json.dumps({"reply": reply.text, "finish_reason": reply.finish_reason,
                          "tool_call": tool_call_json(reply.tool_call), "model": bundle.description,
                          "backend": bundle.backend.name, "patches": patches.summary() if patches else None,
                          "guard_64bit": bundle.guard_summary(guard)}, ensure_ascii=False))
        return 0
    if not streaming:
        sys.stdout.write(reply.text)
    if reply.tool_call is not None:
        sys.stdout.write(("\n" if reply.text else "") + f"[tool call] {reply.tool_call.describe()}")
    sys.stdout.write("\n")
    return 0


def _infer_file(args, bundle, settings, guard) -> int:
    from glmport.errors import DataError
    from glmport.infer import check_context, generate_in_batches, read_prompt_file, read_reply

    records = read_prompt_file(args.file, bundle.family)
    prompts, problems = [], []
    for record in records:
        try:
            prompts.append(bundle.template.prompt_ids(record.messages))
        except GlmportError as exc:  # a conversation the family's format cannot express
            problems += [Problem(record.source, p.what, p.fix) for p in exc.problems] or [Problem(record.source, str(exc))]
    if problems:
        raise DataError(f"{args.file}: {len(problems)} prompt(s) the {bundle.family} format cannot express", problems)
    check_context(bundle, [(record.source, ids) for record, ids in zip(records, prompts)], settings.max_new_tokens)
    with progress_bar(args, len(prompts), "prompt", "generating") as bar:
        rows = generate_in_batches(bundle, prompts, settings, batch_size=args.batch_size, guard_mode=guard,
                                   progress=bar.update)
    lines = []
    for record, row in zip(records, rows):
        reply = read_reply(bundle, row)
        out = dict(record.record, reply=reply.text, finish_reason=reply.finish_reason)
        if reply.tool_call is not None:
            out["tool_call"] = tool_call_json(reply.tool_call)
        lines.append(json.dumps(out, ensure_ascii=False) + "\n")
    if args.output is None:
        sys.stdout.write("".join(lines))
    else:
        write_output(args.output, "".join(lines), "the replies")
        logging.getLogger("glmport").info("wrote %d replies to %s", len(lines), args.output)
    return 0
