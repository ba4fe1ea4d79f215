"""Schema of the annotation store and the migrations that build it.

The schema version lives in ``PRAGMA user_version``. ``MIGRATIONS[i]`` takes a
store from version ``i`` to ``i + 1``; a new store runs all of them. Each
migration runs in one transaction together with the ``user_version`` bump, so a
crash mid-migration leaves the old version intact. A store whose version is
newer than :data:`SCHEMA_VERSION` is refused (see :mod:`.store`).

Version history
  1. studies, labels, boxes, edits + edit_ops (the undo/history log).
  2. model proposals kept apart from accepted boxes (``proposals`` table,
     ``boxes.proposal_id``), index on the edit log by study.
  3. row versions for optimistic concurrency: ``boxes.version``, ``labels.version``,
     ``studies.status_version`` (1 for existing rows; every update checks and bumps it).
  4. the project's label set: ``project`` (key/value rows); ``label_set`` holds a built-in
     set's name as JSON (``"nih14"``) or a user's set as a JSON object
     (:meth:`cxrviewer.core.labelsets.LabelSet.to_json`). Existing projects get ``"nih14"``,
     the 14 classes they could hold, so their rows are unchanged.
"""
from __future__ import annotations

import sqlite3

#: ``PRAGMA application_id`` of a cxrviewer annotation store ("CXRA").
APPLICATION_ID = 0x43585241

#: The columns ``boxes`` (version 1) and ``proposals`` (version 2) start with: row id, study,
#: class and geometry in image pixels (see ``_StudyBox`` in :mod:`.model`). Part of both
#: migrations, so its text is fixed.
_BOX_COLUMNS = """id INTEGER PRIMARY KEY AUTOINCREMENT,
        study_id INTEGER NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
        label TEXT NOT NULL,
        x REAL NOT NULL, y REAL NOT NULL,
        w REAL NOT NULL CHECK (w > 0), h REAL NOT NULL CHECK (h > 0),"""

_V1 = [
    """CREATE TABLE studies (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        sop_uid TEXT UNIQUE,
        content_sha256 TEXT UNIQUE,
        file_name TEXT NOT NULL,
        path TEXT,
        width INTEGER NOT NULL CHECK (width > 0),
        height INTEGER NOT NULL CHECK (height > 0),
        status TEXT NOT NULL DEFAULT 'unseen'
            CHECK (status IN ('unseen', 'in_progress', 'done', 'verified')),
        status_by TEXT,
        status_at TEXT,
        created TEXT NOT NULL,
        last_seen TEXT NOT NULL
    )""",
    "CREATE INDEX studies_file_name ON studies(file_name)",
    "CREATE INDEX studies_path ON studies(path)",
    """CREATE TABLE labels (
        study_id INTEGER NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
        label TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('present', 'absent', 'uncertain')),
        annotator TEXT NOT NULL,
        modified TEXT NOT NULL,
        PRIMARY KEY (study_id, label)
    )""",
    f"""CREATE TABLE boxes (
        {_BOX_COLUMNS}
        annotator TEXT NOT NULL,
        created TEXT NOT NULL,
        modified TEXT NOT NULL,
        modified_by TEXT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('manual', 'model')),
        model_name TEXT,
        score REAL
    )""",
    "CREATE INDEX boxes_study ON boxes(study_id)",
    """CREATE TABLE edits (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        description TEXT NOT NULL,
        who TEXT NOT NULL,
        at TEXT NOT NULL,
        undo_of INTEGER REFERENCES edits(id)
    )""",
    """CREATE TABLE edit_ops (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        edit_id INTEGER NOT NULL REFERENCES edits(id),
        seq INTEGER NOT NULL,
        entity TEXT NOT NULL,
        entity_key TEXT NOT NULL,
        study_id INTEGER NOT NULL REFERENCES studies(id),
        action TEXT NOT NULL CHECK (action IN ('create', 'update', 'delete')),
        before_json TEXT,
        after_json TEXT
    )""",
    "CREATE INDEX edit_ops_edit ON edit_ops(edit_id)",
    "CREATE INDEX edit_ops_key ON edit_ops(entity, entity_key)",
]

_V2 = [
    f"""CREATE TABLE proposals (
        {_BOX_COLUMNS}
        model_name TEXT NOT NULL,
        score REAL,
        status TEXT NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'accepted', 'rejected')),
        created TEXT NOT NULL,
        decided_by TEXT,
        decided_at TEXT
    )""",
    "CREATE INDEX proposals_study ON proposals(study_id, status)",
    "ALTER TABLE boxes ADD COLUMN proposal_id INTEGER REFERENCES proposals(id)",
    "CREATE INDEX edit_ops_study ON edit_ops(study_id)",
]

_V3 = [
    "ALTER TABLE boxes ADD COLUMN version INTEGER NOT NULL DEFAULT 1",
    "ALTER TABLE labels ADD COLUMN version INTEGER NOT NULL DEFAULT 1",
    "ALTER TABLE studies ADD COLUMN status_version INTEGER NOT NULL DEFAULT 1",
]

_V4 = [
    """CREATE TABLE project (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """INSERT INTO project (key, value) VALUES ('label_set', '"nih14"')""",
]

#: ``MIGRATIONS[i]`` upgrades a store from ``user_version == i`` to ``i + 1``.
MIGRATIONS: list[list[str]] = [_V1, _V2, _V3, _V4]
SCHEMA_VERSION = len(MIGRATIONS)


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> list[int]:
    """Run the migrations from the store's version up to ``target``; return versions reached.

    ``conn`` must be in autocommit mode (``isolation_level=None``). Each step is
    one ``BEGIN IMMEDIATE`` ... ``COMMIT`` including the ``user_version`` bump.
    """
    done: list[int] = []
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = user_version(conn)  # re-read under the write lock
            if version >= target:
                conn.execute("ROLLBACK")
                return done
            for stmt in MIGRATIONS[version]:
                conn.execute(stmt)
            if version == 0:
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        done.append(version + 1)
