"""A data directory's layout: how session files are named, and what their lines hold.

- The seed layout (arcan's first store): `<session_id>.jsonl`, one file per session,
  lines without `branch_id`. Every session has the one branch "main".
- The branch layout (newest arcan's `arcan-store`): `<session_id>__<branch_id>.jsonl`,
  one file per branch, every line with `branch_id` and `sequence`.

A directory has one layout. It is read from the files' first lines (the index keeps
them): lines with `branch_id` are of the branch layout, lines without it of the
seed layout, and a directory holding both is refused. A directory whose files say
nothing (none, or all empty) takes the layout `.agentlog.layout` names, or else the
one asked for (`--layout`, default seed); agentlog writes that file whenever it
writes the directory.

The file's name is never parsed where its lines can say: a file's session and branch
are those of its first line. Only a file with no records is named by its file name,
split at the last "__": a branch id holds no "__" and does not start with "_", so
that split is always right for the ids agentlog accepts.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agentlog._records import ForkedFrom
from agentlog._validation import MAIN
from agentlog.errors import FailedPreconditionError, InvalidArgumentError
from agentlog.server._rules import Place, named
from agentlog.server.jsonl.durability import fsync_path

log = logging.getLogger("agentlog.server")

LAYOUT_FILE = ".agentlog.layout"
SUFFIX = ".jsonl"
SEPARATOR = "__"
MAX_FILE_NAME_BYTES = 255


class Layout(enum.StrEnum):
    SEED = "seed"
    BRANCHES = "branches"


@dataclass(frozen=True, slots=True)
class FirstLine:
    """What a file's first record says of the file: its session, its branch (None:
    the line has no `branch_id`, a seed layout line), where it was forked from, and
    whether agentlog started the file (then all its records belong in the feed)."""

    session_id: str
    branch_id: str | None
    forked_from: ForkedFrom | None = None
    started_here: bool = False

    @classmethod
    def of(cls, line: object) -> FirstLine | None:
        """The facts of a parsed first line; None if it is no record."""
        if type(line) is not dict:
            return None
        session_id, branch_id = line.get("session_id"), line.get("branch_id")
        if type(session_id) is not str or (branch_id is not None and type(branch_id) is not str):
            return None
        # agentlog adds `sequence`, which arcan's seed never wrote; newest arcan writes
        # it too, so agentlog marks the files it starts in the branch layout.
        started_here = "sequence" in line if branch_id is None else line.get("agentlog") is True
        return cls(session_id, branch_id, _forked_from(line.get("forked_from")), started_here)

    @property
    def layout(self) -> Layout:
        return Layout.SEED if self.branch_id is None else Layout.BRANCHES


def _forked_from(value: object) -> ForkedFrom | None:
    if type(value) is not dict:
        return None
    session_id, branch_id, sequence = (
        value.get("session_id"),
        value.get("branch_id"),
        value.get("sequence"),
    )
    if type(session_id) is not str or type(branch_id) is not str or type(sequence) is not int:
        return None
    return ForkedFrom(session_id, branch_id, sequence)


def split_stem(stem: str) -> Place | None:
    """The (session, branch) a branch layout file name without records stands for:
    split at its last "__" (see the module's doc); None if it has none."""
    cut = stem.rfind(SEPARATOR)
    if cut <= 0 or cut + len(SEPARATOR) == len(stem):
        return None
    return stem[:cut], stem[cut + len(SEPARATOR) :]


def stem_of(layout: Layout, session_id: str, branch_id: str) -> str | None:
    """The name (less `.jsonl`) of the file that holds a branch in this layout; None
    where the layout has no file for it (a branch other than "main" in the seed
    layout, or a name too long for a file)."""
    if layout is Layout.SEED:
        return session_id if branch_id == MAIN else None
    stem = f"{session_id}{SEPARATOR}{branch_id}"
    if len(stem.encode()) + len(SUFFIX) > MAX_FILE_NAME_BYTES:
        return None
    return stem


def unwritable(layout: Layout, root: Path, session_id: str, branch_id: str) -> Exception:
    """Why a branch cannot be written in this directory (stem_of gave None)."""
    if layout is Layout.SEED:
        return FailedPreconditionError(
            f"{root} has arcan's seed layout (one file per session), which holds only the "
            f'branch "main"; cannot write session {named(session_id, branch_id)}. To use '
            "branches, copy the directory into one in the branch layout (agentlog copy "
            "--layout branches SOURCE DESTINATION) and serve that",
            reason="BRANCHES_NEED_BRANCH_LAYOUT",
            metadata={"session_id": session_id, "branch_id": branch_id, "layout": "seed"},
        )
    return InvalidArgumentError(
        f"session {named(session_id, branch_id)}: the file name "
        f"<session_id>__<branch_id>.jsonl would be longer than {MAX_FILE_NAME_BYTES} bytes; "
        "use shorter ids",
        field="session_id",
        reason="INVALID_SESSION_ID",
    )


def taken(root: Path, stem: str, wanted: Place, holder: Place) -> Exception:
    """The error for a branch whose file name is another branch's file (written by arcan,
    whose branch ids may hold "__")."""
    return FailedPreconditionError(
        f"the file {root / (stem + SUFFIX)} holds session {named(*holder)}, so session "
        f"{named(*wanted)} cannot be written under that name; choose other ids",
        reason="FILE_NAME_TAKEN",
        metadata={"session_id": wanted[0], "branch_id": wanted[1]},
    )


def choose_layout(
    root: Path, found: Iterable[tuple[str, FirstLine]], asked: Layout | None, *, keep: bool
) -> Layout:
    """The directory's layout, from its files' first lines (`found`: file names less
    `.jsonl`, with their first lines), its layout file, or `asked` (None: the default,
    seed). Refuses a directory with both layouts, or one whose files have another
    layout than `asked`. `keep`: write the layout file if it is missing."""
    examples: dict[Layout, str] = {}
    for stem, first in found:
        examples.setdefault(first.layout, stem + SUFFIX)
    if len(examples) > 1:
        raise FailedPreconditionError(
            f"{root} holds files of both arcan layouts: {examples[Layout.SEED]} has lines "
            f"without branch_id (the seed layout) and {examples[Layout.BRANCHES]} lines with "
            "it (the branch layout). A directory has one layout: move the files of one into "
            "a directory of their own (or copy them over with agentlog copy --layout)",
            reason="MIXED_LAYOUTS",
            metadata={"seed": examples[Layout.SEED], "branches": examples[Layout.BRANCHES]},
        )
    marker = root / LAYOUT_FILE
    recorded = _read_marker(marker)
    detected = next(iter(examples), None) or recorded
    if detected is not None and asked is not None and asked is not detected:
        where = f"its files ({examples[detected]})" if examples else LAYOUT_FILE
        raise FailedPreconditionError(
            f"{root} has the {detected} layout ({where} say so), not the {asked} layout "
            f"asked for; serve it without --layout, or copy it into a new directory with "
            f"agentlog copy --layout {asked}",
            reason="LAYOUT_MISMATCH",
            metadata={"layout": str(detected), "asked": str(asked)},
        )
    layout = detected or asked or Layout.SEED
    if keep and recorded is not layout:
        _write_marker(marker, layout)
    return layout


def _read_marker(path: Path) -> Layout | None:
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    except OSError as exc:
        log.warning("%s: cannot read (%s); the layout is read from the files", path, exc)
        return None
    try:
        return Layout(text)
    except ValueError:
        log.warning("%s: %r names no layout (seed or branches); ignored", path, text[:40])
        return None


def _write_marker(path: Path, layout: Layout) -> None:
    temporary = path.with_name(path.name + ".new")
    try:
        temporary.write_text(f"{layout}\n")
        fsync_path(temporary)
        os.replace(temporary, path)
        fsync_path(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        log.warning("%s: cannot record the layout (%s); it is read from the files", path, exc)
