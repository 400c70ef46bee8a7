"""Reading a data file into conversations, with every problem located by file and line.

A file is either JSON lines or one JSON array of objects, whatever its suffix: the first character
tells. Problems are gathered over the whole file and raised together, so that one run shows them all.
With ``skip_invalid`` bad records are set aside with their reason instead, and
:func:`write_skip_report` writes them out: nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from glmport.data.formats import (
    FORMATS,
    RecordError,
    candidate_formats,
    describe_signatures,
    read_record,
)
from glmport.data.records import Conversation
from glmport.errors import DataError, Problem
from glmport.train.outputs import SKIPPED_RECORDS

MAX_LISTED = 20  # problems listed in one error; the rest are counted


class Skipped(NamedTuple):
    source: str
    reason: str
    raw_text: str


@dataclass
class LoadResult:
    path: Path
    format: str
    conversations: list[Conversation] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


class _Raw(NamedTuple):
    """One record as found in the file: where, its text, and its value or why it did not parse."""

    source: str
    text: str
    value: object = None
    json_error: str | None = None


def load_conversations(path, *, fmt: str = "auto", skip_invalid: bool = False, key: str | None = None) -> LoadResult:
    """Read every record of ``path`` (format ``fmt`` or detected from the keys) into conversations.

    ``key`` names the setting the path came from (``data_config.train_file``) for the error messages.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}", [Problem(key or "--format", f"{fmt!r} is not a format",
                                                                  f"use auto or one of {', '.join(FORMATS)}")])
    path = Path(path)
    raws = _raw_records(path, _read_text(path, key))
    fmt = _file_format(path, raws) if fmt == "auto" else fmt
    result = LoadResult(path=path, format=fmt)
    problems: list[Problem] = []
    for raw in raws:
        try:
            result.conversations.append(Conversation(_messages(raw, fmt), raw.source, raw.value))
        except RecordError as exc:
            problems.append(Problem(raw.source, exc.what, exc.fix))
            result.skipped.append(Skipped(raw.source, exc.what, raw.text))
    if problems and (not skip_invalid or not result.conversations):
        raise invalid_records_error(path, problems, len(raws), skip_invalid)
    return result


def write_skip_report(result: LoadResult | list[LoadResult], out_dir) -> Path:
    """Write every skipped record, its source and the reason as JSON lines; return the file's path.

    Pass every split's result at once (a list): the report is one file, written whole each time.
    """
    results = result if isinstance(result, list) else [result]
    lines = [
        json.dumps({"source": s.source, "reason": s.reason, "record": s.raw_text}, ensure_ascii=False) + "\n"
        for r in results for s in r.skipped
    ]
    return write_text_atomically(Path(out_dir) / SKIPPED_RECORDS, "".join(lines))


def write_text_atomically(target: Path, text: str) -> Path:
    """Write to a temporary name beside ``target``, then rename: a reader never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # A name of our own rather than mkstemp's: mkstemp creates the file 0600, and the result should get
    # the permissions of any file the user writes.
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def _read_text(path: Path, key: str | None) -> str:
    where = key or str(path)
    if not path.exists():
        raise DataError("data file not found", [Problem(where, f"no such file: {path}{_relative_note(path)}",
                                                        "check the path")])
    if not path.is_file():
        raise DataError("data path is not a file", [Problem(where, f"{path} is not a file",
                                                            "give the path of a .jsonl or .json file")])
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError("data file is not UTF-8", [Problem(f"{path}:{line}", f"byte {exc.start} cannot be decoded as UTF-8",
                                                           "save the file as UTF-8")]) from None
    if not text.strip():
        raise DataError("data file is empty", [Problem(str(path), "the file holds no records",
                                                       "write one JSON object per line, or a JSON array of objects")])
    return text


def _relative_note(path: Path) -> str:
    return "" if path.is_absolute() else f" (relative to the current directory, {Path.cwd()})"


def _raw_records(path: Path, text: str) -> list[_Raw]:
    raws = _array_records(path, text) if _is_array(text) else _json_lines(path, text)
    if not raws:
        raise DataError("data file holds no records", [Problem(str(path), "the JSON array is empty",
                                                               "put the records (JSON objects) in the array")])
    return raws


def _json_lines(path: Path, text: str) -> list[_Raw]:
    raws = []
    # split("\n"), not splitlines(): U+2028 and friends may sit inside JSON strings.
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            raws.append(_Raw(source, line, json.loads(line)))
        except json.JSONDecodeError as exc:
            if not raws:
                _refuse_single_object(path, text)
            raws.append(_Raw(source, line, json_error=f"invalid JSON: {exc.msg} (column {exc.colno})"))
    return raws


def _refuse_single_object(path: Path, text: str) -> None:
    """A pretty-printed single object fails on its first line; say what it is rather than 'invalid JSON'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return
    if isinstance(value, dict):
        raise DataError("data file holds one JSON object, not records", [Problem(
            f"{path}:1", "the whole file is a single JSON object spread over several lines",
            "write one record per line (JSON lines) or put the records in a JSON array")])


def _is_array(text: str) -> bool:
    """A JSON array starts with "[", unless it is only the first of several lines that each hold a
    value: then the file is JSON lines whose first record is (wrongly) an array."""
    first, _, rest = text.strip().partition("\n")
    if not first.startswith("["):
        return False
    if not rest:
        return True
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return True
    return False


def _array_records(path: Path, text: str) -> list[_Raw]:
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        # In an array a syntax error leaves no way to tell where the next record starts: stop here.
        raise DataError("data file is not valid JSON", [Problem(
            f"{path}:{exc.lineno}", f"invalid JSON: {exc.msg} (column {exc.colno})",
            "fix the JSON syntax there (a .json file holds one JSON array of objects, or one object per line)")]) from None
    # Valid: walk the elements again to learn where each one starts.
    decoder = json.JSONDecoder()
    raws, line, counted = [], 1, 0
    position = _skip_space(text, text.index("[") + 1)
    while text[position] != "]":
        line += text.count("\n", counted, position)
        counted = position
        value, end = decoder.raw_decode(text, position)
        raws.append(_Raw(f"{path}[{len(raws)}] (line {line})", text[position:end], value))
        position = _skip_space(text, end)
        if text[position] == ",":
            position = _skip_space(text, position + 1)
    return raws


def _skip_space(text: str, position: int) -> int:
    while text[position] in " \t\r\n":
        position += 1
    return position


def _file_format(path: Path, raws: list[_Raw]) -> str:
    """The format that reads the most records; records it cannot read are reported by :func:`_messages`.

    Counting what each format *can* read, rather than what each record is detected as, keeps a file of
    OpenAI messages whose records mostly have no tool call (and so read the same as GLM-4's) OpenAI.
    Ties go to the format most records are detected as, then to the one seen first.
    """
    readable: dict[str, int] = {}
    detected: Counter = Counter()
    for raw in raws:
        candidates = candidate_formats(raw.value) if isinstance(raw.value, dict) else ()
        for name in candidates:
            readable[name] = readable.get(name, 0) + 1
        detected.update(candidates[:1])
    if readable:
        return max(readable, key=lambda name: (readable[name], detected[name]))  # max keeps the first of equals
    fix = f"records need the keys of one format ({describe_signatures()}), or pass --format"
    if any(r.json_error for r in raws):  # perhaps the keys are right and only the JSON is wrong: say so
        problems = [Problem(r.source, r.json_error, "each line must hold one complete JSON object") if r.json_error
                    else Problem(r.source, "the record has the keys of no known format", fix) for r in raws]
        raise invalid_records_error(path, problems, len(raws), skip_invalid=False)
    raise DataError("cannot tell the data format", [Problem(str(path), "no record has the keys of a known format", fix)])


def _messages(raw: _Raw, fmt: str):
    if raw.json_error:
        raise RecordError(raw.json_error, "each line must hold one complete JSON object")
    if not isinstance(raw.value, dict):
        return read_record(fmt, raw.value)
    candidates = candidate_formats(raw.value)
    if fmt in candidates:
        return read_record(fmt, raw.value)
    if candidates:
        raise RecordError(f"this record is in the {candidates[0]} format, the file's records are {fmt}",
                          "all records of a file must share one format: convert this one or move it to another file")
    raise RecordError(f"keys {', '.join(map(repr, raw.value)) or '(none)'} match no known format",
                      f"use the keys of the {fmt} format like the other records ({describe_signatures()})")


def invalid_records_error(path: Path, problems: list[Problem], total: int, skip_invalid: bool) -> DataError:
    bad = len(problems)
    head = f"{path}: {bad} of {total} records are invalid"
    if skip_invalid:
        head += " (all of them, so --skip-invalid cannot help)"
    listed = problems[:MAX_LISTED]
    if bad > MAX_LISTED:
        listed.append(Problem(str(path), f"and {bad - MAX_LISTED} more invalid records",
                              "fix the ones above and check again (glmport data check FILE)"))
    return DataError(head, listed)
