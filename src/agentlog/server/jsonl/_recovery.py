"""Start-up recovery of the JSONL store's files."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from agentlog.server.jsonl._sessions import SessionStates
from agentlog.server.jsonl._state import (
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
        """Cut torn last lines and batches cut short off every session file (at open).

        The cut bytes are kept in `.agentlog-recovered/` for inspection. Returns
        the side files written.
        """
        kept = []
        for session_id in self._sessions_in_order():
            path = self._path(session_id)
            cut, why = torn_tail(path)
            if cut is None:
                continue
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

    def _record_counts(self) -> dict[str, int]:
        """How many records each session file holds (at an open after a crash)."""
        counts = {}
        for session_id in self._sessions_in_order():
            path = self._path(session_id)
            identity, indexed = file_identity(path), self._index.indexed(session_id)
            if indexed is not None and (
                (indexed.inode, indexed.size) == identity or self._index.shrunk(session_id)
            ):
                # A file cut behind agentlog's back keeps its feed entries: they are
                # reported as lost when read, not dropped unseen.
                counts[session_id] = indexed.records
            else:
                counts[session_id] = scan_file(path, MARK_EVERY).count
        return counts
