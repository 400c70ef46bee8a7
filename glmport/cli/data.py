"""``glmport data check`` and ``glmport data convert``: look at a data file before training on it."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from glmport.cli._output import print_json, table
from glmport.data.formats import FORMATS  # light: no tokenizer, no torch
from glmport.errors import DataError, GlmportError, ModelError, Problem

FORMAT_CHOICES = ("auto", *FORMATS)
TEMPLATE_CHOICES = ("auto", "chatglm", "chatglm2", "chatglm3", "glm4")


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, at least 1; got {text!r}")
    return int(text)


def add_parser(subparsers, common) -> None:
    data = subparsers.add_parser("data", parents=[common], help="check a data file, or convert it to ChatGLM3 conversations")
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = commands.add_parser("check", parents=[common], help="validate every record; token lengths and truncation")
    p.add_argument("file", metavar="FILE", help="a .jsonl or .json data file")
    p.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=None,
                   help="run the model folder's tokenizer code even when glmport does not know its revision "
                        "(known revisions run by default; --no-trust-remote-code runs none)")
    p.add_argument("--model", metavar="DIR", help="model folder whose tokenizer counts the tokens "
                   "(without it: a tokenizer built on the spot, one token per character)")
    p.add_argument("--format", default="auto", choices=FORMAT_CHOICES, help="record format (default: detected from the keys)")
    p.add_argument("--template", default="auto", choices=TEMPLATE_CHOICES,
                   help="chat template (default: detected from the tokenizer; chatglm3 without --model)")
    p.add_argument("--combine", action="store_true", help="GLM-4: learn only the last reply (upstream's `combine: true`)")
    p.add_argument("--max-input-length", type=_positive, default=256, metavar="N", help="prompt tokens (default 256)")
    p.add_argument("--max-output-length", type=_positive, default=512, metavar="N", help="answer tokens (default 512)")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print the token/label table of the first N samples")
    p.add_argument("--skip-invalid", action="store_true", help="report invalid records and go on with the rest")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_check)

    p = commands.add_parser("convert", parents=[common], help="write a data file as ChatGLM3 `conversations` JSON lines "
                                                                "(or as the ChatGLM-6B tutorial's context/target records)")
    p.add_argument("input", metavar="IN", help="a .jsonl or .json data file in any supported format")
    p.add_argument("output", metavar="OUT", help="the .jsonl file to write")
    p.add_argument("--format", default="auto", choices=FORMAT_CHOICES, help="format of IN (default: detected)")
    p.add_argument("--to", default="conversations", choices=("conversations", "messages", "context-target"),
                   help="format of OUT: ChatGLM3 conversations (default; tool calls as ChatGLM3's tool_call block), "
                        "GLM-4 messages (tool calls as the function name in metadata and JSON arguments), or the "
                        "{context, target} records of the ChatGLM-6B tuning tutorial (alpaca records converted as "
                        "its cover_alpaca2jsonl.py does)")
    p.set_defaults(handler=cmd_convert)


def cmd_check(args, manager) -> int:
    from glmport.data.loader import load_conversations
    from glmport.data.stats import build_samples, check_report
    from glmport.data.templates import get_template, sanity_rows

    result = load_conversations(args.file, fmt=args.format, skip_invalid=args.skip_invalid)
    # A remote-code tokenizer works only while its patch session lasts: everything that tokenizes is inside.
    with contextlib.ExitStack() as stack:
        tokenizer, estimated = _tokenizer(args, manager, result.conversations, stack)
        template = get_template(args.template if args.model else _template_without_model(args), tokenizer,
                                combine=args.combine)
        samples = build_samples(result, template, args.max_input_length, args.max_output_length,
                                skip_invalid=args.skip_invalid)
        tokenizer_note = "estimate: one token per character (no --model)" if estimated else str(args.model)
        report = check_report(result, samples, template, tokenizer_note, args.max_input_length,
                              args.max_output_length)
        if args.json:
            print_json(report)
            return 0
        _print_report(report)
        for number, sample in enumerate(samples.train[: max(args.show, 0)], 1):
            print(f"\nSample {number}: {len(sample.input_ids)} tokens")
            # The token text goes last: wide (CJK) characters would break the column alignment.
            print(table(["ID", "LABEL", "TOKEN"], [[token_id, label, repr(text)]
                                                   for text, token_id, label in sanity_rows(tokenizer, sample)]))
    return 0


def _template_without_model(args) -> str:
    if args.template != "auto":
        return args.template
    return "glm4" if args.combine else "chatglm3"  # combine exists only for GLM-4


def _tokenizer(args, manager, conversations, stack: contextlib.ExitStack):
    """The model's tokenizer, or one built on the spot (then lengths are estimates): (tokenizer, estimated).
    ``stack`` holds what the tokenizer needs while it is used (the backend and the patch session)."""
    if args.model:
        if not Path(args.model).is_dir():
            raise ModelError(f"--model {args.model}: no such folder", [Problem(
                "--model", f"{args.model} is not a folder", "give the folder of a ChatGLM3 / GLM-4 model")])
        try:
            if (Path(args.model) / "config.json").is_file():
                return stack.enter_context(_model_tokenizer(args, manager)), False
            # a folder of tokenizer files only: nothing of it runs (no trust_remote_code)
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(args.model), False
        except GlmportError:  # consent, patch preflight, a broken config.json: already a clear message
            raise
        except Exception as exc:  # any other failure to load is the same message to the user
            raise ModelError(f"cannot load a tokenizer from {args.model}", [Problem(
                "--model", f"{args.model}: {type(exc).__name__}: {exc}",
                "give the folder of a ChatGLM3 / GLM-4 model (it holds tokenizer_config.json)")]) from None
    from glmport.tiny.tokenizer import CHATGLM3, LAYOUTS, build_fast_tokenizer

    layout = LAYOUTS.get(_template_without_model(args), CHATGLM3)
    # Seeding the vocabulary with the file's characters gives one token per character; without it,
    # characters outside ASCII would be counted as their UTF-8 bytes.
    seed = "".join(sorted({ch for conv in conversations for m in conv.messages for ch in _text_of(m)}))
    try:
        return build_fast_tokenizer(layout, seed), True
    except ValueError:  # more distinct characters than a vocabulary holds: count bytes instead
        return build_fast_tokenizer(layout), True


@contextlib.contextmanager
def _model_tokenizer(args, manager):
    """A model folder's tokenizer loaded as ``glmport train`` loads it: on the selected backend, with the same
    consent to run the folder's code and the same patch session (the remote tokenizers fail on transformers
    5 without its compat patches)."""
    from glmport.backend import select_backend
    from glmport.modeling import RemoteCodeConsent, inspect_model_dir, patched_tokenizer

    info = inspect_model_dir(Path(args.model))
    consent = RemoteCodeConsent(trust=args.trust_remote_code, allow_unverified=args.trust_remote_code is True)
    backend = select_backend(manager.backends, args.backend).backend
    with backend.activate(), patched_tokenizer(info, backend, mode="train", patch_sets=manager.patch_sets,
                                               consent=consent) as tokenizer:
        yield tokenizer


def _text_of(message) -> str:
    tools = json.dumps(message.tools, ensure_ascii=False) if message.tools is not None else ""
    return message.content + message.metadata + tools


def _print_report(report: dict) -> None:
    print(f"{report['file']}: {report['records']} records in the {report['format']} format, "
          f"{report['valid']} valid; template {report['template']}")
    print(f"  tokenizer: {report['tokenizer']}")
    if report["tokenizer"].startswith("estimate"):
        print("  (lengths below are character-level estimates; pass --model DIR for exact token counts)")
    counts = ", ".join(f"{role} {n}" for role, n in report["messages"].items())
    print(f"\nMessages: {counts}")
    print(f"Conversations: {report['multi_turn']} multi-turn, {report['with_tools']} with tools")
    lengths, trimmed = report["train_tokens"], report["trimmed"]
    print(f"\nTrain samples, before truncation (budget {report['max_input_length']} + "
          f"{report['max_output_length']} + 1 = {report['budget']} tokens):")
    print(table(["P50", "P90", "P99", "MAX"], [[lengths["p50"], lengths["p90"], lengths["p99"], lengths["max"]]]))
    valid = report["valid"]
    print(f"Trimmed by glmport: {trimmed['samples']} of {valid} samples ({trimmed['tokens']} tokens, "
          f"{trimmed['messages']} earlier messages dropped); every sample keeps its labels")
    print(f"Upstream's tail truncation would leave {report['upstream_truncation_loses_all_labels']} of {valid} "
          "samples without any label (loss 0 or NaN)")
    print(f"Eval samples: {report['eval_samples']}")
    if report["skipped"]:
        print(f"\nSkipped (--skip-invalid): {len(report['skipped'])} of {report['records']} records")
        for skipped in report["skipped"]:
            print(f"  {skipped['source']}: {skipped['reason']}")


def cmd_convert(args, manager) -> int:
    from glmport.data.loader import load_conversations, write_text_atomically
    from glmport.data.records import to_conversations_record

    source, target = Path(args.input), Path(args.output)
    if target.resolve() == source.resolve() or (source.exists() and target.exists() and target.samefile(source)):
        raise DataError("refusing to overwrite the input file", [Problem(
            str(target), "OUT is the input file", "write the converted records to another file")])
    result = load_conversations(source, fmt=args.format)
    if args.to == "context-target":
        records = _context_target_records(result)
    elif args.to == "messages":
        records = [_glm4_messages_record(conv) for conv in result.conversations]
    else:
        records = [to_conversations_record(conv) for conv in result.conversations]
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    write_text_atomically(target, "".join(lines))
    what = {"conversations": "conversations", "messages": "GLM-4 messages records"}.get(args.to, "context/target records")
    print(f"wrote {len(lines)} {what} ({result.format} -> {args.to}) to {target}")
    return 0


def _glm4_messages_record(conv) -> dict:
    """``conv`` in GLM-4's ``messages`` form, each message as the glm4 template renders it: a tool call as its
    function name (``metadata``) and JSON arguments, tools on the system message (which has no text when
    glmport added it only to declare them)."""
    from glmport.data.records import message_record
    from glmport.toolcalls import family_message

    return {"messages": [message_record(family_message("glm4", message)) for message in conv.messages]}


def _context_target_records(result) -> list[dict]:
    """Every conversation as a context/target record; the ones that do not fit are reported together."""
    from glmport.data.context_target import to_context_target_record
    from glmport.data.loader import invalid_records_error

    records, problems = [], []
    for conv in result.conversations:
        try:
            records.append(to_context_target_record(conv, result.format))
        except DataError as exc:
            problems += exc.problems or [Problem(conv.source, str(exc))]
    if problems:
        raise invalid_records_error(result.path, problems, len(result.conversations), skip_invalid=False)
    return records
