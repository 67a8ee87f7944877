"""One artifact set for a fleet: every replica serves the SAEs a file names, and follows its edits.

    rudder serve --artifact-set /etc/rudder/artifacts/saes.txt

The file holds one `NAME=SOURCE` line per SAE (SOURCE: a folder on the server, or
`saelens:RELEASE/SAE_ID`); `#` starts a comment. The server loads them at start and then reads the
file every `poll_s` seconds (a Kubernetes ConfigMap volume is updated in place, with no event a
process could wait on): a new line is loaded, a removed line is unloaded (streams that use the SAE
end FAILED_PRECONDITION at their next token, as with UnloadSae), a line whose source changed is
unloaded and loaded again. To roll out new weights, point the line at a new folder.

A bad line (not NAME=SOURCE, a missing folder, a width mismatch) is logged with its line number and
skipped; the rest serves, and the line is tried again at every poll until it loads or changes. In
this mode LoadSae and UnloadSae are refused with FAILED_PRECONDITION naming the file: the file is
the one truth every replica reads (write-through from one pod would reach the others only through
whatever writes the ConfigMap). SAEs given with --sae stay as they are.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from rudder.core import sae_sources
from rudder.core.errors import RudderError

log = logging.getLogger(__name__)

POLL_S = 2.0


@dataclass(frozen=True)
class Entry:
    name: str
    source: str
    line: int


def parse(text: str) -> tuple[dict[str, Entry], list[str]]:
    """The entries of an artifact-set file, and a message for each line that is not one."""
    entries: dict[str, Entry] = {}
    problems: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, source = (part.strip() for part in line.partition("="))
        if not sep or not name or not source or any(c.isspace() for c in name):
            problems.append(f"line {n}: {line!r} is not NAME=PATH or NAME=saelens:RELEASE/SAE_ID")
        elif name in entries:
            problems.append(f"line {n}: {name!r} is already named on line {entries[name].line}; this line is skipped")
        else:
            entries[name] = Entry(name, source, n)
    return entries, problems


class ArtifactSet:
    """Reconciles an engine's SAEs with the file at `path` (see the module's docstring)."""

    def __init__(self, path: str | Path, engine, poll_s: float = POLL_S):
        self.path, self.engine, self.poll_s = Path(path), engine, poll_s
        self.applied: dict[str, str] = {}  # name -> source, as loaded from the file
        self.failed: dict[str, str] = {}  # name -> the last error logged for it
        self._text: str | None = None
        self._read_error: str | None = None

    async def reconcile(self) -> list[str]:
        """Match the loaded SAEs to the file once; the new problems found (each also logged)."""
        try:
            text = await asyncio.to_thread(self.path.read_text)
        except OSError as e:
            message = f"cannot read it ({e.strerror}); the SAEs it named stay loaded"
            new, self._read_error = message != self._read_error, message
            return self._log([message] if new else [])
        self._read_error = None
        if text == self._text and not self.failed:
            return []
        fresh, self._text = text != self._text, text
        entries, problems = parse(text)
        if not fresh:
            problems = []  # the file's own problems were logged when it changed
        for name, source in list(self.applied.items()):
            if name not in entries or entries[name].source != source:
                del self.applied[name]
                if name in self.engine.artifacts.saes:
                    await self.engine.unload_sae(name)
                log.info("artifact set %s: unloaded SAE %s", self.path, name)
        self.failed = {n: m for n, m in self.failed.items() if n in entries}
        for e in entries.values():
            if e.name in self.applied:
                continue
            try:
                path = await asyncio.to_thread(sae_sources.resolve, e.source)
                await self.engine.load_sae(f"{e.name}={path}")
            except RudderError as err:
                message = f"line {e.line}: SAE {e.name!r} ({e.source}): {err}"
                if self.failed.get(e.name) != message:  # a line that keeps failing is logged once
                    problems.append(message)
                self.failed[e.name] = message
                continue
            self.failed.pop(e.name, None)
            self.applied[e.name] = e.source
            log.info("artifact set %s: loaded SAE %s from %s", self.path, e.name, e.source)
        return self._log(problems)

    def _log(self, problems: list[str]) -> list[str]:
        for p in problems:
            log.error("artifact set %s: %s", self.path, p)
        return problems

    async def watch(self) -> None:
        """Reconcile every `poll_s` seconds until cancelled; an unexpected error is logged, not fatal."""
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("artifact set %s: reconcile failed; trying again in %.0f s", self.path, self.poll_s)
