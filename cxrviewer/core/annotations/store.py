"""The annotation store: one SQLite file per annotation project (``project.cxrann``).

Durability. The store runs in WAL mode with ``synchronous=FULL`` and commits every
edit in its own ``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction, data rows and the
edit log together. With WAL, ``synchronous=NORMAL`` already survives a killed
*process* (the committed frames are in the OS cache), but a power cut or OS crash
may roll back the last transactions, because the WAL is only fsynced at
checkpoints. ``FULL`` fsyncs the WAL on every commit, so an edit the user saw
committed stays committed even after a power cut; the benchmark
``benchmarks/annotations_save.py`` measures what that costs per edit.

Concurrency. Several store instances (processes) may open one file: WAL gives
any number of readers plus one writer; every write takes the write lock up
front (``BEGIN IMMEDIATE``) and waits up to ``busy_timeout`` seconds for it, so
no transaction can deadlock half-way. Reads run outside transactions and always
see the newest commit (``changed_elsewhere()`` tells the GUI when to redraw).
Optimistic concurrency: boxes, labels and review statuses carry a row version (schema
v3) that every update checks (``WHERE id = ? AND version = ?``) and bumps. An edit is
checked against the version this instance last *read* (or an explicit ``version=``),
so an edit made from a stale view raises :class:`AnnotationConflictError` ("box N was
changed by another editor ...; reload the study") and nothing of it (or of its batch)
is written; re-reading the study refreshes the versions. Undo/redo check that each row
still matches what the edit expects and refuse (:class:`EditConflictError`, a subclass)
rather than overwrite another instance's work.

``read_only=True`` opens the file with SQLite's ``mode=ro``; on read-only media (the
folder is not writable and no ``-wal`` is left) with ``immutable=1``, which creates no
``-wal``/``-shm`` file. Edits then raise :class:`AnnotationStoreError`. A folder, a
non-SQLite or a damaged file (``PRAGMA quick_check`` at open) and read errors later all
raise :class:`AnnotationStoreError` with a one-line message, never ``sqlite3`` errors.

Label set. The project records its label set (schema v4, :attr:`AnnotationStore.label_set`;
``nih14`` for older projects): boxes and image labels must use its labels (any spelling or
synonym, stored as the set's label), proposals of other classes are kept but refused on
accept until mapped (``accept_proposal(id, label=...)``) or added (:meth:`AnnotationStore.add_labels`).

Undo. Every edit method returns an :class:`Edit` (full before/after rows);
:meth:`AnnotationStore.undo` applies its inverse as a *new* committed edit, so
the file always matches what the user sees. :class:`UndoStack` keeps the
session's edits (unlimited) for the GUI.
"""
from __future__ import annotations

import getpass
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from ..errors import AnnotationConflictError, AnnotationStoreError, LabelSetError
from ..geometry import Box
from ..labelsets import BUILTIN, DEFAULT, LabelSet, get_label_set, label_set_from_json, normalise
from .migrations import APPLICATION_ID, SCHEMA_VERSION, migrate, user_version
from .model import (
    BOX_SOURCES, LABEL_CODES, LABEL_STATES, REVIEW_STATUSES, AnnotatedBox, Edit,
    EditConflictError, InvalidBoxError, Op, Proposal, StudyIdentity, StudyRecord,
    TrainingRecord, clamp_box, utc_now,
)

log = logging.getLogger(__name__)

#: Suggested file suffix of an annotation project.
SUFFIX = ".cxrann"
#: Largest older-schema store opened read-only by migrating a copy in memory (bytes).
MAX_IN_MEMORY_UPGRADE = 256 * 1024 * 1024
#: What a damaged file raises while it is read (turned into :class:`AnnotationStoreError`).
_DAMAGE = (sqlite3.DatabaseError, UnicodeDecodeError, json.JSONDecodeError)


@dataclass(frozen=True)
class _Entity:
    name: str
    table: str
    key: tuple[str, ...]
    fields: tuple[str, ...]
    who: str
    when: str
    stamp_on_insert: bool = True
    version: str | None = None  # the row-version column (optimistic concurrency), if any

    @property
    def compared(self) -> tuple[str, ...]:
        """Fields an undo/redo checks against the stored row (content, not stamps/versions)."""
        return tuple(f for f in self.fields if f not in (self.who, self.when, self.version))


_BOX_FIELDS = ("id", "study_id", "label", "x", "y", "w", "h", "annotator", "created",
               "modified", "modified_by", "source", "model_name", "score", "proposal_id",
               "version")
_PROPOSAL_FIELDS = ("id", "study_id", "label", "x", "y", "w", "h", "model_name", "score",
                    "status", "created", "decided_by", "decided_at")
_ENTITIES: dict[str, _Entity] = {
    "box": _Entity("box", "boxes", ("id",), _BOX_FIELDS, "modified_by", "modified",
                   version="version"),
    "label": _Entity("label", "labels", ("study_id", "label"),
                     ("study_id", "label", "state", "annotator", "modified", "version"),
                     "annotator", "modified", version="version"),
    "status": _Entity("status", "studies", ("id",),
                      ("id", "status", "status_by", "status_at", "status_version"),
                      "status_by", "status_at", version="status_version"),
    "proposal": _Entity("proposal", "proposals", ("id",), _PROPOSAL_FIELDS,
                        "decided_by", "decided_at", stamp_on_insert=False),
}


def _key_values(ent: _Entity, key: Any) -> tuple:
    return tuple(key) if len(ent.key) > 1 else (key,)


def _default_annotator() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "unknown"


@dataclass
class BatchResult:
    """Handle of :meth:`AnnotationStore.batch`; ``edit`` is set when the batch commits."""

    description: str
    edit: Edit | None = None
    _ops: list[Op] = field(default_factory=list)


@dataclass(frozen=True)
class HistoryEntry:
    """One row of the edit log: a create/update/delete with before/after, who and when."""

    edit_id: int
    kind: str
    who: str
    at: str
    entity: str
    key: Any
    action: str
    before: dict | None
    after: dict | None


class AnnotationStore:
    """SQLite-backed annotation project (see the module docstring for the guarantees).

    ``annotator`` is recorded on every edit (defaults to the login name).
    ``busy_timeout`` is how long a write waits for another instance's write.
    ``label_set``: the label set of a new project (a built-in name such as ``"vindr-cxr"``, a
    user's ``.json``/``.txt`` file or a :class:`~cxrviewer.core.labelsets.LabelSet`; default
    ``nih14``). An existing project keeps its own; naming another one raises
    :class:`AnnotationStoreError`. See :attr:`label_set`.
    """

    def __init__(self, path: str | os.PathLike, *, annotator: str | None = None,
                 read_only: bool = False, create: bool = True, busy_timeout: float = 10.0,
                 synchronous: str = "FULL", label_set: LabelSet | str | None = None) -> None:
        self.path = Path(path)
        self.annotator = (annotator or _default_annotator()).strip() or "unknown"
        self.read_only = bool(read_only)
        #: A user-readable note about how the store was opened (read-only, no WAL ...).
        self.notice: str | None = None
        self._lock = threading.RLock()
        #: called after each committed transaction (background durability hook)
        self.on_commit: Callable[[], Any] | None = None
        self._batch: BatchResult | None = None
        #: row versions this instance last read or wrote: (entity, key) -> version. An edit of a
        #: row checks it (optimistic concurrency); versions seen inside a transaction wait in
        #: ``_unsettled`` until it commits.
        self._seen: dict[tuple[str, Any], int] = {}
        self._unsettled: dict[tuple[str, Any], int | None] = {}
        self._ls_cache: tuple[str, LabelSet] | None = None
        self._created = False
        self._conn = self._connect(create, busy_timeout, synchronous.upper())
        if label_set is not None:
            try:
                self._adopt_label_set(get_label_set(label_set))
            except BaseException:
                self.close()
                raise
        self._data_version = self._pragma("data_version")

    # ---- opening ---------------------------------------------------------------
    def _check_file(self, create: bool) -> bool:
        """Refuse folders, unreadable and non-SQLite files; return whether the store exists."""
        p = self.path
        try:
            if p.exists() and not p.is_file():
                raise AnnotationStoreError("is a folder (or device), not an annotation store",
                                           path=str(p))
            exists = p.exists() and p.stat().st_size > 0
            if exists:
                with open(p, "rb") as fh:
                    head = fh.read(16)
        except OSError as exc:
            raise AnnotationStoreError(f"cannot read the annotation store ({exc.strerror or exc})",
                                       path=str(p)) from exc
        if not exists and (self.read_only or not create):
            raise AnnotationStoreError("no annotation store here", path=str(p))
        if exists and head != b"SQLite format 3\x00":
            raise AnnotationStoreError(
                "not an annotation store (not an SQLite file); nothing was changed", path=str(p))
        return exists

    def _open_conn(self, busy_timeout: float) -> sqlite3.Connection:
        """The SQLite connection: read-write, ``mode=ro``, or ``immutable=1`` on read-only media."""
        p = self.path
        if not self.read_only:
            if p.exists() and not _folder_writable(p.parent):
                raise AnnotationStoreError(
                    "the folder is read-only, so the store cannot be opened for editing (its "
                    "-wal file goes beside it); open it read-only", path=str(p))
            p.parent.mkdir(parents=True, exist_ok=True)
            return sqlite3.connect(str(p), isolation_level=None, timeout=busy_timeout,
                                   check_same_thread=False)
        wal = p.with_name(p.name + "-wal")
        if not wal.exists() and not _folder_writable(p.parent):
            # read-only media: no -shm/-wal can be made; nobody can write here either
            query = "immutable=1"
            self.notice = ("opened read-only from a read-only folder: edits are disabled and "
                           "changes made elsewhere show after reopening")
        else:
            query = "mode=ro"
            self.notice = "opened read-only: edits are disabled"
        return sqlite3.connect(p.resolve().as_uri() + "?" + query, uri=True, isolation_level=None,
                               timeout=busy_timeout, check_same_thread=False)

    def _connect(self, create: bool, busy_timeout: float, synchronous: str) -> sqlite3.Connection:
        p = self.path
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        existed = self._check_file(create)
        self._created = not existed
        try:
            conn = self._open_conn(busy_timeout)
        except (sqlite3.DatabaseError, OSError) as exc:
            raise AnnotationStoreError(f"cannot open the annotation store ({exc})",
                                       path=str(p)) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            version = self._validate(conn)  # before anything is written to a foreign file
            if existed:
                self._quick_check(conn)
            if not self.read_only:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    self.notice = (f"this folder does not support WAL (journal mode {mode}); "
                                   "edits are still committed at once, but other programs "
                                   "cannot read while one writes")
                    log.warning("%s: %s", p, self.notice)
                conn.execute(f"PRAGMA synchronous = {synchronous}")
            if version < SCHEMA_VERSION and self.read_only:
                conn = self._upgrade_in_memory(conn, version)
            elif version < SCHEMA_VERSION:
                self._upgrade(conn, version)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, (*_DAMAGE, OSError)):
                raise AnnotationStoreError(f"cannot open the annotation store ({_one_line(exc)})",
                                           path=str(p)) from exc
            raise
        return conn

    def _quick_check(self, conn: sqlite3.Connection) -> None:
        """Refuse a damaged file (zeroed or garbage pages) at open, not at the first read."""
        res = [str(r[0]) for r in conn.execute("PRAGMA quick_check(3)").fetchall()]
        if res != ["ok"]:
            raise AnnotationStoreError(
                f"the annotation store is damaged ({_one_line('; '.join(res))}); restore it from "
                "a backup (e.g. its .bak file)", path=str(self.path))

    def _validate(self, conn: sqlite3.Connection) -> int:
        """Refuse foreign SQLite files and newer schemas; return the store's version."""
        version = user_version(conn)
        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
        n_tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if (version > 0 and app_id != APPLICATION_ID) or (version == 0 and n_tables):
            raise AnnotationStoreError(
                "this SQLite file is not a cxrviewer annotation store; nothing was changed",
                path=str(self.path))
        if version > SCHEMA_VERSION:
            raise AnnotationStoreError(
                f"written by a newer cxrviewer (store schema v{version}, this version reads up "
                f"to v{SCHEMA_VERSION}); update cxrviewer to open it. The file was not changed.",
                path=str(self.path))
        if version < SCHEMA_VERSION and self.read_only and (
                self.path.stat().st_size > MAX_IN_MEMORY_UPGRADE):
            raise AnnotationStoreError(
                f"store schema v{version} must be upgraded to v{SCHEMA_VERSION}; "
                "open it once without read-only mode", path=str(self.path))
        return version

    def _upgrade_in_memory(self, conn: sqlite3.Connection, version: int) -> sqlite3.Connection:
        """A read-only store of an older schema: migrate a private in-memory copy (the file is
        not touched) so that it can be read, e.g. from read-only media."""
        mem = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        try:
            conn.backup(mem)
            migrate(mem)
        except BaseException:
            mem.close()
            raise
        conn.close()
        self.notice = (f"opened read-only (schema v{version}, upgraded in memory only): edits "
                       "are disabled and changes made elsewhere show after reopening")
        return mem

    def _upgrade(self, conn: sqlite3.Connection, version: int) -> None:
        """Back up an existing store (``<name>.v<N>.bak``), then run the migrations (a new file:
        all of them, which builds it at the current schema; only an upgrade is logged)."""
        if version > 0:
            backup = self.path.with_name(f"{self.path.name}.v{version}.bak")
            dst = sqlite3.connect(str(backup))
            try:
                conn.backup(dst)
            finally:
                dst.close()
            log.info("%s: backed up schema v%d to %s before upgrading", self.path, version, backup)
        reached = migrate(conn)
        if version == 0:  # a brand-new file: created at the current schema, nothing was migrated
            log.debug("%s: new annotation store (schema v%s)", self.path, reached[-1] if reached else version)
        else:
            log.info("%s: schema migrated to v%s", self.path, reached[-1] if reached else version)

    # ---- the project's label set -------------------------------------------------
    def _adopt_label_set(self, wanted: LabelSet) -> None:
        """A new project takes ``wanted``; an existing one must already have it."""
        if self._created and not self.read_only:
            self.set_label_set(wanted)
            return
        have = self.label_set
        if have.to_json() != wanted.to_json():
            raise AnnotationStoreError(
                f"this project's label set is {have.display_name} ({have.name}), not "
                f"{wanted.display_name}; a project keeps the label set it was created with "
                "(add labels to it with 'cxrviewer annotations add-labels')", path=str(self.path))

    @property
    def label_set(self) -> LabelSet:
        """The project's label set (schema v4; ``nih14`` for projects made before it).

        Boxes, image labels and accepted proposals use its labels, stored under their
        canonical spelling (``Infiltrate`` -> ``Infiltration``); exports list its labels.
        """
        with self._reading():
            row = self._conn.execute("SELECT value FROM project WHERE key = 'label_set'").fetchone()
        text = None if row is None else str(row[0])
        if text is None:
            return DEFAULT
        if self._ls_cache is not None and self._ls_cache[0] == text:
            return self._ls_cache[1]
        try:
            ls = label_set_from_json(json.loads(text))
        except (ValueError, LabelSetError) as exc:
            raise AnnotationStoreError(f"the project's label set is damaged ({_one_line(exc)})",
                                       path=str(self.path)) from None
        self._ls_cache = (text, ls)
        return ls

    def set_label_set(self, label_set: LabelSet) -> None:
        """Record the project's label set (committed at once; inside a batch: with it).

        Not an undoable edit. Stored rows are not renamed: use :meth:`add_labels` to extend
        the set, which keeps every label the project's rows use.
        """
        with self._lock, self._write():
            self._put_label_set(label_set)

    def _put_label_set(self, label_set: LabelSet) -> None:
        value = json.dumps(label_set.name if BUILTIN.get(label_set.name) == label_set
                           else label_set.to_json())
        self._conn.execute("INSERT INTO project (key, value) VALUES ('label_set', ?) "
                           "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (value,))

    def add_labels(self, names: Iterable[str]) -> LabelSet:
        """Extend the project's label set with ``names`` not in it yet (``--add-unknown``);
        returns the new set (the same one when nothing was new)."""
        with self._lock, self._write():
            base = self.label_set
            extended = extend_label_set(base, names)
            if extended is not base:
                self._put_label_set(extended)
            return extended

    def check_label(self, label: str) -> str:
        """``label``'s canonical name in the project's label set, or :class:`InvalidBoxError`."""
        ls = self.label_set
        name = ls.canonical(label) if isinstance(label, str) else None
        if name is None:
            shown = ", ".join(ls.labels[:20]) + (", ..." if len(ls) > 20 else "")
            raise InvalidBoxError(
                f"unknown class {label!r}: not in this project's label set {ls.display_name} "
                f"({shown}); add it with 'cxrviewer annotations add-labels PROJECT NAME'")
        return name

    # ---- housekeeping -----------------------------------------------------------
    @property
    def schema_version(self) -> int:
        return user_version(self._conn)

    def _pragma(self, name: str) -> Any:
        with self._reading():
            return self._conn.execute(f"PRAGMA {name}").fetchone()[0]

    def close(self) -> None:
        """Close the connection (idempotent). Every edit was already committed."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> "AnnotationStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check`` (``"ok"`` for a sound file) plus a foreign-key check."""
        with self._reading():
            res = self._conn.execute("PRAGMA integrity_check").fetchall()
            text = "\n".join(str(r[0]) for r in res)
            fk = self._conn.execute("PRAGMA foreign_key_check").fetchall()
        return text if not fk else f"{text}\nforeign key violations: {fk}"

    def changed_elsewhere(self) -> bool:
        """True once after another instance/process committed since the last call."""
        v = self._pragma("data_version")
        changed = v != self._data_version
        self._data_version = v
        return changed

    refresh = changed_elsewhere  # reads are never cached: "refresh" just asks what changed

    # ---- transactions ------------------------------------------------------------
    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Hold the lock for a read; a damaged file gives :class:`AnnotationStoreError`."""
        with self._lock:
            if self._conn is None:
                raise AnnotationStoreError("the annotation store is closed", path=str(self.path))
            try:
                yield
            except _DAMAGE as exc:
                raise AnnotationStoreError(f"cannot read the annotation store ({_one_line(exc)})",
                                           path=str(self.path)) from exc

    def _note(self, entity: str, key: Any, version: int | None) -> None:
        """Remember a row's version (``None``: the row is gone) as seen by this instance."""
        k = (entity, key)
        try:
            v = None if version is None else int(version)
        except (TypeError, ValueError):  # a damaged row: remember nothing
            v = None
        if self._conn is not None and self._conn.in_transaction:
            self._unsettled[k] = v
        elif v is None:
            self._seen.pop(k, None)
        else:
            self._seen[k] = v

    def _settle(self, committed: bool) -> None:
        """End of the outermost transaction: keep the versions it saw only if it committed."""
        pending, self._unsettled = self._unsettled, {}
        if committed:
            for k, v in pending.items():
                if v is None:
                    self._seen.pop(k, None)
                else:
                    self._seen[k] = v

    def seen_version(self, entity: str, key: Any) -> int | None:
        """The version of a row (``"box"``, id) this instance last read or wrote (None: unknown)."""
        with self._lock:
            k = (entity, key)
            return self._unsettled[k] if k in self._unsettled else self._seen.get(k)

    def _check_writable(self) -> None:
        if self._conn is None:
            raise AnnotationStoreError("the annotation store is closed", path=str(self.path))
        if self.read_only:
            raise AnnotationStoreError("the annotation store is open read-only; "
                                       "the edit was not made", path=str(self.path))

    @contextmanager
    def _write(self) -> Iterator[None]:
        self._check_writable()
        if self._batch is not None:  # join the open batch transaction (as a savepoint)
            self._conn.execute("SAVEPOINT part")
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK TO part")
                self._conn.execute("RELEASE part")
                raise
            self._conn.execute("RELEASE part")
            return
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise AnnotationStoreError(
                f"another program is writing this store ({exc}); the edit was not made, try again",
                path=str(self.path)) from exc
        try:
            yield
            self._conn.execute("COMMIT")
            self._settle(True)
            if self.on_commit is not None:  # e.g. WalSyncer.submit: fsync off this thread
                self.on_commit()
        except BaseException as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            self._settle(False)
            if isinstance(exc, _DAMAGE):
                raise AnnotationStoreError(f"edit refused by the store: {_one_line(exc)}",
                                           path=str(self.path)) from exc
            raise

    # ---- primitive rows ---------------------------------------------------------------
    def _fetch(self, ent: _Entity, key: Any) -> dict | None:
        where = " AND ".join(f"{k} = ?" for k in ent.key)
        cur = self._conn.execute(f"SELECT {', '.join(ent.fields)} FROM {ent.table} WHERE {where}",
                                 _key_values(ent, key))
        row = cur.fetchone()
        return dict(zip(ent.fields, row)) if row is not None else None

    def _apply(self, op: Op, expected: int | None = None) -> Op:
        """Write one planned op after checking the row still matches ``op.before`` (content)
        and, for ``expected``, the row version this editor last saw (optimistic concurrency)."""
        ent = _ENTITIES[op.entity]
        cur = self._fetch(ent, op.key) if op.key is not None else None
        if expected is not None and ent.version is not None:
            self._check_version(ent, op.key, cur, expected)
        exp = op.before
        if (cur is None) != (exp is None) or (
                cur is not None and any(cur[f] != exp.get(f) for f in ent.compared)):  # type: ignore[union-attr]
            state = "is gone" if cur is None else ("already exists" if exp is None else
                                                   "was changed elsewhere")
            raise EditConflictError(f"{op.entity} {op.key} {state}; the edit was not applied",
                                    path=str(self.path))
        key_where = " AND ".join(f"{k} = ?" for k in ent.key)
        ver = ent.version
        if cur is not None and ver is not None:  # the row must still be the one just read
            key_where_v, key_args = f"{key_where} AND {ver} = ?", [*_key_values(ent, op.key), cur[ver]]
        else:
            key_where_v, key_args = key_where, list(_key_values(ent, op.key))
        if op.after is None:
            c = self._conn.execute(f"DELETE FROM {ent.table} WHERE {key_where_v}", key_args)
            self._check_count(ent, op.key, c.rowcount)
            if ver is not None:
                self._note(op.entity, op.key, None)
            return Op(op.entity, op.key, cur, None)
        row = {f: op.after.get(f) for f in ent.fields}
        if cur is not None or ent.stamp_on_insert:
            row[ent.who] = self.annotator
            row[ent.when] = utc_now()
        if ver is not None:  # never reused: a re-created row continues its old count
            base = (cur[ver] if cur is not None else
                    max(int(op.after.get(ver) or 0), self._logged_version(ent, op.key)))
            row[ver] = int(base) + 1
        key = op.key
        if cur is None:
            cols = [f for f in ent.fields if not (f in ent.key and row[f] is None)]
            c = self._conn.execute(
                f"INSERT INTO {ent.table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [row[f] for f in cols])
            if key is None:
                key = row["id"] = int(c.lastrowid)  # type: ignore[arg-type]
        else:
            cols = [f for f in ent.fields if f not in ent.key]
            c = self._conn.execute(
                f"UPDATE {ent.table} SET {', '.join(f'{f} = ?' for f in cols)} WHERE {key_where_v}",
                [row[f] for f in cols] + key_args)
            self._check_count(ent, key, c.rowcount)
        if ver is not None:
            self._note(op.entity, key, row[ver])
        return Op(op.entity, key, cur, row)

    def _logged_version(self, ent: _Entity, key: Any) -> int:
        """Highest version the edit log ever recorded for a row (0: none), so that a deleted
        row created again (undo, redo, a label set again) never repeats a version."""
        if key is None or ent.version is None:
            return 0
        row = self._conn.execute(
            f"SELECT max(max(coalesce(json_extract(after_json, '$.{ent.version}'), 0), "
            f"coalesce(json_extract(before_json, '$.{ent.version}'), 0))) FROM edit_ops "
            "WHERE entity = ? AND entity_key = ?", (ent.name, json.dumps(key))).fetchone()
        return int(row[0] or 0) if row else 0

    @staticmethod
    def _what(ent: _Entity, key: Any) -> str:
        if ent.name == "label":
            return f"label {key[1]} of study {key[0]}"
        if ent.name == "status":
            return f"the review status of study {key}"
        return f"{ent.name} {key}"

    def _check_version(self, ent: _Entity, key: Any, cur: dict | None, expected: int) -> None:
        """Raise :class:`AnnotationConflictError` unless the row is at version ``expected``."""
        if cur is None:
            raise AnnotationConflictError(
                f"{self._what(ent, key)} was deleted by another editor; reload the study")
        assert ent.version is not None
        if int(cur[ent.version]) != int(expected):
            raise AnnotationConflictError(
                f"{self._what(ent, key)} was changed by another editor ({cur.get(ent.who)}, "
                f"version {cur[ent.version]}, you edited version {expected}); reload the study")

    def _unchanged(self, entity: str, key: Any, cur: dict | None,
                   version: int | None = None) -> list[Op]:
        """No op for an edit that changes nothing, unless it was made from a stale read
        (then :class:`AnnotationConflictError`, as for a real change)."""
        expected = version if version is not None else self.seen_version(entity, key)
        if expected is not None and cur is not None:
            self._check_version(_ENTITIES[entity], key, cur, expected)
        return []

    def _check_count(self, ent: _Entity, key: Any, count: int) -> None:
        if count != 1:
            raise AnnotationConflictError(
                f"{self._what(ent, key)} was changed by another editor while saving; "
                "reload the study")

    def _expected(self, op: Op, kind: str, expect: dict | None) -> int | None:
        """The row version an edit of ``op``'s row must find (None: no check).

        Undo/redo check the row's content instead (:class:`EditConflictError`).
        """
        if kind in ("undo", "redo") or op.before is None or op.key is None:
            return None
        k = (op.entity, op.key)
        if expect and k in expect and expect[k] is not None:
            return int(expect[k])
        return self.seen_version(*k)

    def _log(self, kind: str, description: str, ops: list[Op], at: str,
             undo_of: int | None) -> int:
        c = self._conn.execute(
            "INSERT INTO edits (kind, description, who, at, undo_of) VALUES (?, ?, ?, ?, ?)",
            (kind, description, self.annotator, at, undo_of))
        eid = int(c.lastrowid)  # type: ignore[arg-type]
        self._conn.executemany(
            "INSERT INTO edit_ops (edit_id, seq, entity, entity_key, study_id, action, "
            "before_json, after_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(eid, i, op.entity, json.dumps(op.key), op.study_id, op.action,
              None if op.before is None else json.dumps(op.before),
              None if op.after is None else json.dumps(op.after)) for i, op in enumerate(ops)])
        return eid

    def _edit(self, kind: str, description: str, plan: Callable[[], list[Op]],
              undo_of: int | None = None, expect: dict | None = None) -> Edit:
        """Plan and apply ops under the write lock; commit them as one logged edit.

        ``expect``: (entity, key) -> the row version the caller edited (default: the
        version this instance last saw); a row at another version raises
        :class:`AnnotationConflictError` and nothing of the edit is written.
        """
        with self._lock:
            at = utc_now()
            # inside a batch, _write() is a savepoint: a part that fails leaves no trace
            with self._write():
                applied = [self._apply(op, self._expected(op, kind, expect)) for op in plan()]
                if self._batch is not None:
                    self._batch._ops.extend(applied)
                    eid = None
                else:
                    eid = self._log(kind, description, applied, at, undo_of) if applied else None
            return Edit(eid, kind, description, tuple(applied), self.annotator, at, undo_of)

    @contextmanager
    def batch(self, description: str = "edit") -> Iterator[BatchResult]:
        """Group edits into one transaction and one undo step (paste, carry, import).

        ``with store.batch("paste 3 boxes") as b: ...`` then ``b.edit``. If the body
        raises, nothing of the batch is written. Nested batches join the outer one.
        """
        with self._lock:
            if self._batch is not None:
                yield self._batch
                return
            handle = BatchResult(description)
            at = utc_now()
            with self._write():
                self._batch = handle
                try:
                    yield handle
                finally:
                    self._batch = None
                eid = (self._log("batch", description, handle._ops, at, None)
                       if handle._ops else None)
            handle.edit = Edit(eid, "batch", description, tuple(handle._ops), self.annotator, at)

    # ---- studies -----------------------------------------------------------------
    _STUDY_COLS = ("id", "sop_uid", "content_sha256", "file_name", "path", "width", "height",
                   "status", "status_by", "status_at", "created", "last_seen", "status_version")

    def _study_from_row(self, row: tuple) -> StudyRecord:
        d = dict(zip(self._STUDY_COLS, row))
        ident = StudyIdentity(d["file_name"], d["sop_uid"], d["content_sha256"])
        return StudyRecord(d["id"], ident, d["path"], d["width"], d["height"], d["status"],
                           d["status_by"], d["status_at"], d["created"], d["last_seen"])

    def _select_studies(self, where: str = "", args: tuple = (),
                        order: str = "id") -> list[StudyRecord]:
        with self._reading():
            rows = self._conn.execute(
                f"SELECT {', '.join(self._STUDY_COLS)} FROM studies {where} ORDER BY {order}",
                args).fetchall()
            for r in rows:
                self._note("status", r[0], r[-1])
        return [self._study_from_row(r) for r in rows]

    def study(self, study_id: int) -> StudyRecord:
        found = self._select_studies("WHERE id = ?", (int(study_id),))
        if not found:
            raise AnnotationStoreError(f"no study {study_id} in this store", path=str(self.path))
        return found[0]

    def studies(self, status: str | Iterable[str] | None = None) -> list[StudyRecord]:
        """All studies (optionally only those with a review status in ``status``)."""
        if status is None:
            return self._select_studies()
        wanted = (status,) if isinstance(status, str) else tuple(status)
        marks = ", ".join("?" * len(wanted))
        return self._select_studies(f"WHERE status IN ({marks})", wanted)

    def find_study(self, identity: StudyIdentity | None = None, *,
                   path: str | os.PathLike | None = None) -> StudyRecord | None:
        """Look a study up: SOP UID, then content hash, then (unresolved imports) path/name/stem.

        With only ``path``: the study last seen at that path (a hint, not an identity).
        """
        if identity is not None:
            if identity.sop_uid:
                r = self._select_studies("WHERE sop_uid = ?", (identity.sop_uid,))
                if r:
                    return r[0]
            if identity.sha256:
                r = self._select_studies("WHERE content_sha256 = ?", (identity.sha256,))
                if r:
                    return r[0]
            unresolved = "sop_uid IS NULL AND content_sha256 IS NULL"
            if path is not None:
                r = self._select_studies(f"WHERE {unresolved} AND path = ?", (str(path),))
                if r:
                    return r[0]
            r = self._select_studies(f"WHERE {unresolved} AND file_name = ?", (identity.file_name,))
            if len(r) == 1 or (r and not identity.resolved):
                return r[0]
            if identity.resolved:  # re-encoded copy (NIH .png list, .jpg folder): unique stem
                stem = PurePath(identity.file_name).stem
                r = [x for x in self._select_studies(
                    f"WHERE {unresolved} AND file_name LIKE ? ESCAPE '\\'",
                    (_like_escape(stem) + ".%",)) if PurePath(x.identity.file_name).stem == stem]
                if len(r) == 1:
                    return r[0]
            return None
        if path is not None:
            r = self._select_studies("WHERE path = ?", (str(path),), order="last_seen DESC, id DESC")
            return r[0] if r else None
        raise ValueError("find_study needs an identity or a path")

    def ensure_study(self, identity: StudyIdentity, *, width: int, height: int,
                     path: str | os.PathLike | None = None) -> StudyRecord:
        """Find the study (see :meth:`find_study`) or create it; remember where it was seen.

        A study found under a different path gets its path updated (a moved folder
        does not orphan its annotations); a study imported without identity gets
        the identity filled in. Committed at once (inside a batch: with the batch);
        not an undoable edit.
        """
        if int(width) <= 0 or int(height) <= 0:
            raise InvalidBoxError(f"image size must be positive, got {width} x {height}")
        spath = None if path is None else str(path)
        with self._lock, self._write():
            now = utc_now()
            rec = self.find_study(identity, path=spath)
            if rec is None:
                c = self._conn.execute(
                    "INSERT INTO studies (sop_uid, content_sha256, file_name, path, width, height, "
                    "created, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (identity.sop_uid, identity.sha256, identity.file_name, spath, int(width),
                     int(height), now, now))
                sid = int(c.lastrowid)  # type: ignore[arg-type]
            else:
                sid = rec.id
                sets: dict[str, Any] = {"last_seen": now}
                if spath is not None and spath != rec.path:
                    if rec.path:
                        log.info("study %s moved: %s -> %s", rec.identity.key, rec.path, spath)
                    sets["path"] = spath
                if not rec.identity.resolved and identity.resolved:
                    sets.update(sop_uid=identity.sop_uid, content_sha256=identity.sha256,
                                file_name=identity.file_name)
                if (rec.width, rec.height) != (int(width), int(height)):
                    log.warning("study %s: stored size %dx%d, image is %dx%d; keeping the image's",
                                rec.identity.key, rec.width, rec.height, width, height)
                    sets.update(width=int(width), height=int(height))
                self._conn.execute(
                    f"UPDATE studies SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?",
                    [*sets.values(), sid])
        return self.study(sid)

    def register_study(self, study: Any) -> StudyRecord:
        """:meth:`ensure_study` for a loaded :class:`~cxrviewer.core.study.Study`."""
        h, w = study.shape
        return self.ensure_study(StudyIdentity.from_study(study), width=w, height=h,
                                 path=study.meta.source_path)

    def _study_size(self, study_id: int) -> tuple[int, int]:
        row = self._conn.execute("SELECT width, height FROM studies WHERE id = ?",
                                 (int(study_id),)).fetchone()
        if row is None:
            raise AnnotationStoreError(f"no study {study_id} in this store", path=str(self.path))
        return int(row[0]), int(row[1])

    # ---- reads ---------------------------------------------------------------------
    def boxes(self, study_id: int) -> list[AnnotatedBox]:
        """Accepted boxes of a study, oldest first."""
        with self._reading():
            rows = self._conn.execute(
                f"SELECT {', '.join(_BOX_FIELDS)} FROM boxes WHERE study_id = ? ORDER BY id",
                (int(study_id),)).fetchall()
        out = [AnnotatedBox(**dict(zip(_BOX_FIELDS, r))) for r in rows]
        with self._lock:
            for b in out:
                self._note("box", b.id, b.version)
        return out

    def box(self, box_id: int) -> AnnotatedBox:
        with self._reading():
            row = self._fetch(_ENTITIES["box"], int(box_id))
            if row is not None:
                self._note("box", row["id"], row["version"])
        if row is None:
            raise AnnotationStoreError(f"no box {box_id} in this store", path=str(self.path))
        return AnnotatedBox(**row)

    def labels(self, study_id: int) -> dict[str, str]:
        """Image-level labels set for a study: class -> present/absent/uncertain."""
        with self._reading():
            rows = self._conn.execute("SELECT label, state, version FROM labels WHERE study_id = ?",
                                      (int(study_id),)).fetchall()
            for r in rows:
                self._note("label", (int(study_id), r[0]), r[2])
        return {r[0]: r[1] for r in rows}

    def proposals(self, study_id: int, status: str | None = None) -> list[Proposal]:
        q = f"SELECT {', '.join(_PROPOSAL_FIELDS)} FROM proposals WHERE study_id = ?"
        args: list[Any] = [int(study_id)]
        if status is not None:
            q += " AND status = ?"
            args.append(status)
        with self._reading():
            rows = self._conn.execute(q + " ORDER BY id", args).fetchall()
        return [Proposal(**dict(zip(_PROPOSAL_FIELDS, r))) for r in rows]

    def history(self, *, study_id: int | None = None, box_id: int | None = None,
                limit: int | None = None) -> list[HistoryEntry]:
        """The edit log (oldest first): every create/update/delete with before/after, who, when."""
        q = ("SELECT e.id, e.kind, e.who, e.at, o.entity, o.entity_key, o.action, o.before_json, "
             "o.after_json FROM edit_ops o JOIN edits e ON e.id = o.edit_id")
        conds, args = [], []
        if study_id is not None:
            conds.append("o.study_id = ?")
            args.append(int(study_id))
        if box_id is not None:
            conds.append("o.entity = 'box' AND o.entity_key = ?")
            args.append(json.dumps(int(box_id)))
        if conds:
            q += " WHERE " + " AND ".join(conds)
        q += " ORDER BY e.id, o.seq"
        if limit is not None:
            q += f" LIMIT {int(limit)}"
        with self._reading():
            rows = self._conn.execute(q, args).fetchall()
            return [HistoryEntry(r[0], r[1], r[2], r[3], r[4], _load_key(r[5]), r[6],
                                 None if r[7] is None else json.loads(r[7]),
                                 None if r[8] is None else json.loads(r[8])) for r in rows]

    def edit(self, edit_id: int) -> Edit:
        """Rebuild a logged edit (e.g. to undo one from an earlier session)."""
        with self._reading():
            head = self._conn.execute(
                "SELECT id, kind, description, who, at, undo_of FROM edits WHERE id = ?",
                (int(edit_id),)).fetchone()
            if head is None:
                raise AnnotationStoreError(f"no edit {edit_id} in the log", path=str(self.path))
            rows = self._conn.execute(
                "SELECT entity, entity_key, before_json, after_json FROM edit_ops "
                "WHERE edit_id = ? ORDER BY seq", (int(edit_id),)).fetchall()
            ops = tuple(Op(r[0], _load_key(r[1]), None if r[2] is None else json.loads(r[2]),
                           None if r[3] is None else json.loads(r[3])) for r in rows)
        return Edit(head[0], head[1], head[2], ops, head[3], head[4], head[5])

    def edit_ids(self) -> list[int]:
        with self._reading():
            return [r[0] for r in self._conn.execute("SELECT id FROM edits ORDER BY id")]

    # ---- edits -----------------------------------------------------------------------
    def add_box(self, study_id: int, label: str, x: float, y: float, w: float, h: float, *,
                source: str = "manual", model_name: str | None = None,
                score: float | None = None) -> Edit:
        """Add an accepted box (original-image pixels; clamped to the image)."""
        return self._edit("add_box", f"add {label} box",
                          lambda: [self._plan_new_box(study_id, label, x, y, w, h, source,
                                                      model_name, score, None)])

    def _plan_new_box(self, study_id: int, label: str, x: float, y: float, w: float, h: float,
                      source: str, model_name: str | None, score: float | None,
                      proposal_id: int | None) -> Op:
        if source not in BOX_SOURCES:
            raise InvalidBoxError(f"box source must be one of {BOX_SOURCES}, not {source!r}")
        if source == "model" and not model_name:
            raise InvalidBoxError("a box from a model needs the model's name")
        width, height = self._study_size(study_id)
        g = clamp_box(x, y, w, h, width, height)
        now = utc_now()
        after = dict(id=None, study_id=int(study_id), label=self.check_label(label), x=g.x, y=g.y,
                     w=g.w, h=g.h, annotator=self.annotator, created=now, modified=now,
                     modified_by=self.annotator, source=source, model_name=model_name,
                     score=None if score is None else float(score), proposal_id=proposal_id)
        return Op("box", None, None, after)

    def add_boxes(self, study_id: int, boxes: Iterable[Box], description: str = "paste boxes",
                  ) -> Edit:
        """Add several boxes as one transaction and one undo step (paste / carry over)."""
        with self.batch(description) as b:
            for bx in boxes:
                self.add_box(study_id, bx.label, bx.x, bx.y, bx.w, bx.h)
        assert b.edit is not None
        return b.edit

    def _existing(self, entity: str, key: Any, what: str) -> dict:
        row = self._fetch(_ENTITIES[entity], key)
        if row is None and self.seen_version(entity, key) is not None:
            raise AnnotationConflictError(f"{what} {key} was deleted by another editor; "
                                          "reload the study")
        if row is None:
            raise AnnotationStoreError(f"no {what} {key} in this store", path=str(self.path))
        return row

    def update_box(self, box_id: int, *, label: str | None = None, x: float | None = None,
                   y: float | None = None, w: float | None = None,
                   h: float | None = None, version: int | None = None) -> Edit:
        """Move/resize/relabel a box (clamped); an unchanged box gives an empty Edit.

        ``version``: the box version the caller edited (default: the one this instance last
        read); another editor's newer version raises :class:`AnnotationConflictError`.
        """
        def plan() -> list[Op]:
            cur = self._existing("box", int(box_id), "box")
            width, height = self._study_size(cur["study_id"])
            g = clamp_box(cur["x"] if x is None else x, cur["y"] if y is None else y,
                          cur["w"] if w is None else w, cur["h"] if h is None else h,
                          width, height)
            after = dict(cur, x=g.x, y=g.y, w=g.w, h=g.h,
                         label=cur["label"] if label is None else self.check_label(label))
            if all(after[f] == cur[f] for f in ("label", "x", "y", "w", "h")):
                return self._unchanged("box", int(box_id), cur, version)
            return [Op("box", int(box_id), cur, after)]
        return self._edit("update_box", f"edit box {box_id}", plan,
                          expect={("box", int(box_id)): version})

    def delete_box(self, box_id: int, *, version: int | None = None) -> Edit:
        """Delete a box (``version``: as in :meth:`update_box`)."""
        def plan() -> list[Op]:
            cur = self._existing("box", int(box_id), "box")
            return [Op("box", int(box_id), cur, None)]
        return self._edit("delete_box", f"delete box {box_id}", plan,
                          expect={("box", int(box_id)): version})

    def set_label(self, study_id: int, label: str, state: str | None) -> Edit:
        """Set an image-level label to present/absent/uncertain (``None`` clears it)."""
        name = self.check_label(label)
        if state is not None and state not in LABEL_STATES:
            raise ValueError(f"label state must be one of {LABEL_STATES} or None, not {state!r}")

        def plan() -> list[Op]:
            self._study_size(study_id)
            key = (int(study_id), name)
            cur = self._fetch(_ENTITIES["label"], key)
            if (cur["state"] if cur else None) == state:
                return self._unchanged("label", key, cur)
            after = None if state is None else dict(study_id=int(study_id), label=name,
                                                    state=state, annotator=self.annotator,
                                                    modified=utc_now())
            return [Op("label", key, cur, after)]
        return self._edit("set_label", f"{name}: {state or 'unset'}", plan)

    def set_status(self, study_id: int, status: str) -> Edit:
        """Set the review status (unseen / in_progress / done / verified)."""
        if status not in REVIEW_STATUSES:
            raise ValueError(f"review status must be one of {REVIEW_STATUSES}, not {status!r}")

        def plan() -> list[Op]:
            cur = self._existing("status", int(study_id), "study")
            if cur["status"] == status:
                return self._unchanged("status", int(study_id), cur)
            return [Op("status", int(study_id), cur, dict(cur, status=status))]
        return self._edit("set_status", f"status {status}", plan)

    def add_proposals(self, study_id: int, boxes: Iterable[Box], model_name: str) -> Edit:
        """Store a model's box proposals (kept apart from accepted boxes).

        Proposals are clamped to the image; empty ones are skipped with a log line. A class
        the project's label set knows (by spelling or synonym) is stored as its label; any
        other is stored as the model named it, shown, and cannot be accepted until mapped
        (:meth:`accept_proposal` with ``label=``, or :meth:`add_labels`).
        """
        if not model_name:
            raise ValueError("proposals need the model's name")

        def plan() -> list[Op]:
            width, height = self._study_size(study_id)
            ops, now, ls = [], utc_now(), self.label_set
            for bx in boxes:
                try:
                    g = clamp_box(bx.x, bx.y, bx.w, bx.h, width, height)
                    label = _proposal_label(ls, bx.label)
                except InvalidBoxError as exc:
                    log.info("skipping proposal from %s: %s", model_name, exc)
                    continue
                ops.append(Op("proposal", None, None, dict(
                    id=None, study_id=int(study_id), label=label, x=g.x, y=g.y,
                    w=g.w, h=g.h, model_name=model_name,
                    score=None if bx.score is None else float(bx.score), status="pending",
                    created=now, decided_by=None, decided_at=None)))
            return ops
        return self._edit("add_proposals", f"{model_name} proposals", plan)

    def accept_proposal(self, proposal_id: int, label: str | None = None) -> Edit:
        """Copy a pending proposal into ``boxes`` (source "model", its model and score).

        ``label``: the project label to accept it as (a model class the project's label set
        does not hold must be mapped so, else :class:`UnmappedProposalError`).
        """
        def plan() -> list[Op]:
            cur = self._pending(proposal_id)
            if label is None and cur["label"] not in self.label_set:
                ls = self.label_set
                raise UnmappedProposalError(
                    f"proposal {proposal_id}: the model's class {cur['label']!r} is not in this "
                    f"project's label set {ls.display_name}; map it to one of the project's labels "
                    "(select it and choose a class: it is accepted as that class) or add it to "
                    "the project's labels "
                    f"('cxrviewer annotations add-labels PROJECT {cur['label']!r}')")
            name = cur["label"] if label is None else label
            box = self._plan_new_box(cur["study_id"], name, cur["x"], cur["y"], cur["w"],
                                     cur["h"], "model", cur["model_name"], cur["score"],
                                     int(proposal_id))
            return [box, Op("proposal", int(proposal_id), cur, dict(cur, status="accepted"))]
        return self._edit("accept_proposal", f"accept proposal {proposal_id}", plan)

    def reject_proposal(self, proposal_id: int) -> Edit:
        def plan() -> list[Op]:
            cur = self._pending(proposal_id)
            return [Op("proposal", int(proposal_id), cur, dict(cur, status="rejected"))]
        return self._edit("reject_proposal", f"reject proposal {proposal_id}", plan)

    def _pending(self, proposal_id: int) -> dict:
        cur = self._existing("proposal", int(proposal_id), "proposal")
        if cur["status"] != "pending":
            raise AnnotationStoreError(f"proposal {proposal_id} was already {cur['status']}",
                                       path=str(self.path))
        return cur

    # ---- undo / redo -------------------------------------------------------------------
    def undo(self, edit: Edit) -> Edit:
        """Apply the inverse of ``edit`` as a new committed edit (kind ``"undo"``)."""
        inv = edit.inverse()
        return self._edit("undo", inv.description, lambda: list(inv.ops), undo_of=edit.id)

    def redo(self, edit: Edit) -> Edit:
        """Re-apply ``edit`` (after :meth:`undo`) as a new committed edit (kind ``"redo"``)."""
        return self._edit("redo", f"Redo {edit.description}", lambda: list(edit.ops),
                          undo_of=edit.id)


class UnmappedProposalError(InvalidBoxError):
    """A proposal's class is not in the project's label set (map it or add it first)."""


def _proposal_label(ls: LabelSet, name: str) -> str:
    """A proposal's class as the project's label, else as the model wrote it (trimmed)."""
    known = ls.canonical(name) if isinstance(name, str) else None
    if known is not None:
        return known
    raw = " ".join(str(name).split())
    if not raw or len(raw) > 128 or not raw.isprintable():
        raise InvalidBoxError(f"proposal class {name!r} is not a class name")
    return raw


def extend_label_set(base: LabelSet, names: Iterable[str]) -> LabelSet:
    """``base`` with the ``names`` it lacks appended (``base`` itself when none is new).

    A built-in set becomes ``<name>+custom``, titled "<its title> + N added".
    """
    add: dict[str, str] = {}
    for n in names:
        clean = " ".join(str(n).split())
        if clean and clean not in base and normalise(clean) not in add:
            add[normalise(clean)] = clean
    if not add:
        return base
    root_name = base.name.split("+")[0]
    root = BUILTIN.get(root_name)
    labels = base.labels + tuple(add.values())
    if root is not None and labels[:len(root)] == root.labels:
        title = f"{root.display_name} + {len(labels) - len(root)} added"
    else:
        title = base.title
    return LabelSet(f"{root_name}+custom" if root is not None else base.name, labels,
                    dict(base.synonyms), title=title)


def _folder_writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (False on read-only media)."""
    return os.access(folder, os.W_OK)


def _one_line(exc: object, limit: int = 200) -> str:
    """``str(exc)`` on one line, at most ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _load_key(text: str) -> Any:
    k = json.loads(text)
    return tuple(k) if isinstance(k, list) else k


class UndoStack:
    """Per-session, unlimited undo/redo over a store, driven by the GUI.

    ``push(store.add_box(...))`` after each edit; ``undo()``/``redo()`` commit the
    inverse/forward edit at once and return it (``None`` when there is nothing to
    do). On :class:`EditConflictError` the stacks are left unchanged.
    ``on_change`` (optional callable) is called after every change of the stacks.
    """

    def __init__(self, store: AnnotationStore,
                 on_change: Callable[["UndoStack"], None] | None = None) -> None:
        self.store = store
        self.on_change = on_change
        self._undo: list[Edit] = []
        self._redo: list[Edit] = []

    def push(self, edit: Edit) -> Edit:
        """Record a committed edit (empty edits are ignored); clears the redo stack."""
        if edit.empty:
            return edit
        if edit.id is None:
            raise ValueError("push the committed edit (a batch's .edit), not a part of a batch")
        self._undo.append(edit)
        self._redo.clear()
        self._changed()
        return edit

    def undo(self) -> Edit | None:
        """Undo the latest edit; the committed inverse edit, or ``None`` if there is nothing to undo."""
        return self._move(self._undo, self._redo, self.store.undo)

    def redo(self) -> Edit | None:
        """Redo the latest undone edit; the committed edit, or ``None`` if there is nothing to redo."""
        return self._move(self._redo, self._undo, self.store.redo)

    def _move(self, source: list[Edit], target: list[Edit],
              apply: Callable[[Edit], Edit]) -> Edit | None:
        """Commit ``apply`` of ``source``'s top edit, then move that edit onto ``target``.

        ``None`` when ``source`` is empty; if ``apply`` raises, both stacks are left as they were.
        """
        if not source:
            return None
        edit = source[-1]
        applied = apply(edit)
        source.pop()
        target.append(edit)
        self._changed()
        return applied

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    @property
    def undo_text(self) -> str:
        return self._undo[-1].description if self._undo else ""

    @property
    def redo_text(self) -> str:
        return self._redo[-1].description if self._redo else ""

    def __len__(self) -> int:
        return len(self._undo)

    def clear(self) -> None:
        self._undo.clear()
        self._redo.clear()
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)


def iter_training_records(store: AnnotationStore, *,
                          status: str | Iterable[str] | None = None,
                          ) -> Iterator[TrainingRecord]:
    """Yield ``(identity, path, labels, boxes)`` per study for ``cxr-train``.

    ``labels`` maps class -> 1 present / 0 absent / -1 uncertain (unset classes are
    absent from the dict); ``boxes`` are the accepted boxes as plain
    :class:`~cxrviewer.core.geometry.Box` in original pixels. ``status`` restricts
    to review statuses (e.g. ``("done", "verified")``).
    """
    for rec in store.studies(status):
        labels = {k: LABEL_CODES[v] for k, v in store.labels(rec.id).items()}
        boxes = [b.to_box() for b in store.boxes(rec.id)]
        yield TrainingRecord(rec.identity, rec.path, labels, boxes)
