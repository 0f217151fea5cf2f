"""Start-up recovery of the JSONL store's files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from agentlog.server.jsonl._sessions import SessionStates
from agentlog.server.jsonl._state import (
    MISSING,
    RECOVERED_DIR,
    file_identity,
)
from agentlog.server.jsonl.durability import fsync_path
from agentlog.server.jsonl.files import (
    scan_file,
    torn_tail,
)
from agentlog.server.jsonl.index import MARK_EVERY

log = logging.getLogger("agentlog.server")


class Recovery(SessionStates):
    """What an open does after a crash: cut torn tails off, count records."""

    recovered_sessions: list[Path]

    def _recover_tails(self) -> list[Path]:
        """Finish what a crash left unfinished at the end of every session file (at
        open), in one step: cut an incomplete last line and the rest of a batch cut
        short (never acknowledged), keeping the bytes in `.agentlog-recovered/`, and
        give a last record that lacks only its newline its newline. Returns the side
        files written."""
        kept = []
        for stem in self._stems_in_order():
            path = self._path(stem)
            tail = torn_tail(path)
            if tail.complete:
                self._complete_last_line(path)
                continue
            if tail.cut is None:
                continue
            cut, why = tail.cut, tail.why
            side_dir = self.root / RECOVERED_DIR
            side = side_dir / f"{path.name}.{cut}"
            try:
                side_dir.mkdir(exist_ok=True)
                with path.open("rb") as file:
                    file.seek(cut)
                    side.write_bytes(file.read())
                fsync_path(side)
            except OSError as exc:
                # Not cut without a copy: the session refuses reads and appends until
                # a start with room for the copy.
                log.error("%s: cannot keep %s in %s (%s); not cut", path, why, side_dir, exc)
                continue
            os.truncate(path, cut)
            fsync_path(path)
            fsync_path(side_dir)
            self.recovered_sessions.append(path)
            log.warning(
                "%s: cut %s at byte offset %d off the file (never acknowledged); "
                "the bytes are kept in %s",
                path,
                why,
                cut,
                side,
            )
            kept.append(side)
        return kept

    def _complete_last_line(self, path: Path) -> None:
        """End a file whose last line is a whole record without its newline (arcan died
        between writing the record and the newline, and reads the record): with the
        newline, the next line appended starts a line of its own."""
        try:
            with path.open("ab") as file:
                file.write(b"\n")
            fsync_path(path)
        except OSError as exc:
            log.error("%s: cannot end its last line with a newline (%s)", path, exc)
            return
        log.warning(
            "%s: its last line is a whole record without the newline that ends it; added "
            "the newline (the record is kept, as arcan reads it)",
            path,
        )

    def _record_counts(self) -> dict[str, int]:
        """How many records each session file holds (at an open after a crash)."""
        counts = {}
        for stem in self._index.stems():
            indexed = self._index.indexed(stem)
            if indexed is not None and file_identity(self._path(stem)) == MISSING:
                counts[stem] = indexed.records  # removed: reported as lost when read
        for stem in self._stems_in_order():
            path = self._path(stem)
            identity, indexed = file_identity(path), self._index.indexed(stem)
            if indexed is not None and (
                (indexed.inode, indexed.size) == identity or self._index.shrunk(stem)
            ):
                # A file cut behind agentlog's back keeps its feed entries: they are
                # reported as lost when read, not dropped unseen.
                counts[stem] = indexed.records
            else:
                counts[stem] = scan_file(path, MARK_EVERY).count
        return counts
