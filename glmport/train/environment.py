"""Environment variables set for one run and restored afterwards, so an in-process caller keeps its own."""

from __future__ import annotations

import os


class EnvironmentChanges:
    """``with EnvironmentChanges() as env: env.set(...)``: every variable is back as it was on exit."""

    def __init__(self) -> None:
        self.previous: dict[str, str | None] = {}

    def set(self, key: str, value: str, *, keep_existing: bool = False) -> None:
        if keep_existing and key in os.environ:
            return
        self.previous.setdefault(key, os.environ.get(key))
        os.environ[key] = value

    def restore(self) -> None:
        for key, value in self.previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.previous.clear()

    def __enter__(self) -> EnvironmentChanges:
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()
