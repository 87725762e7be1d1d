-- A journal of layout 1 (the release before the catalogue, commit 3cf586c), written by
-- its own Journal class: one reading, a cursor, a shelf state, an alert state.
PRAGMA user_version=1;
BEGIN TRANSACTION;
CREATE TABLE alert_states (key TEXT PRIMARY KEY, body BLOB NOT NULL);
INSERT INTO "alert_states" VALUES('K0',X'7B227374617465223A226F6B222C22657069736F6465223A307D');
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE device_cursors (
    device TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    window BLOB NOT NULL,
    ts REAL NOT NULL,
    applied INTEGER NOT NULL,
    floor INTEGER,
    holes BLOB,
    gaps INTEGER,
    missing INTEGER
);
INSERT INTO "device_cursors" VALUES('s0',1,1,X'',1800000001.0,1,0,X'5B5D',0,0);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE idempotency (
    key TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    digest TEXT NOT NULL,
    status INTEGER NOT NULL,
    order_id TEXT NOT NULL,
    created_ts REAL NOT NULL
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO "meta" VALUES('schema_version','1');
CREATE TABLE orders (
    order_id TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    external_id TEXT NOT NULL,
    state TEXT NOT NULL,
    open INTEGER NOT NULL,
    updated_ts REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE readings (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    channel INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    weight_g REAL NOT NULL,
    shelf TEXT NOT NULL
);
INSERT INTO "readings" VALUES(1,'s0',0,1,1,1800000001.0,1500.0,'sh0');
CREATE TABLE shelf_calibrations (shelf TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE shelf_states (shelf TEXT PRIMARY KEY, body BLOB NOT NULL);
INSERT INTO "shelf_states" VALUES('sh0',X'7B22756E697473223A31302C22737461747573223A226F6B227D');
CREATE UNIQUE INDEX readings_identity ON readings (device, epoch, seq);
CREATE UNIQUE INDEX orders_external ON orders (channel, external_id);
CREATE INDEX orders_open ON orders (open) WHERE open = 1;
COMMIT;
