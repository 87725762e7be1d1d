-- A journal written by Floorhand before its layout was versioned (commit 51e9d41: PRAGMA
-- user_version 0, meta schema_version '1'), as sqlite3's iterdump. Opened by today's controller
-- in tests/unit/test_journal_migrations.py; never edit it (it stands for journals on sites).
BEGIN TRANSACTION;
CREATE TABLE alert_states (key TEXT PRIMARY KEY, body BLOB NOT NULL);
INSERT INTO "alert_states" VALUES('SKU-1',X'7B227374617465223A226C6F77222C22657069736F6465223A317D');
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO "counters" VALUES('sorter_cmd_id',7);
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
INSERT INTO "dead_letters" VALUES(1,1800000001.0,'floorhand/demo/A/scale/x','bad_json','not JSON',5,X'7B6F6F7073');
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
INSERT INTO "device_cursors" VALUES('scale-a1',3,4,X'',1800000004.0,3,1,X'5B5B332C335D5D',1,1);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    body BLOB NOT NULL
);
INSERT INTO "events" VALUES(1,1800000004.0,'stock_changed',X'7B226B696E64223A2273746F636B5F6368616E676564222C227368656C66223A22412D3031227D');
CREATE TABLE idempotency (
    key TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    digest TEXT NOT NULL,
    status INTEGER NOT NULL,
    order_id TEXT NOT NULL,
    created_ts REAL NOT NULL
);
INSERT INTO "idempotency" VALUES('key-1','floor-1','dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd',201,'o-1',1800000005.0);
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
INSERT INTO "orders" VALUES('o-1','api','ext-1','RECEIVED',1,1800000005.0,X'7B226F726465725F6964223A226F2D31222C226368616E6E656C223A22617069222C2265787465726E616C5F6964223A226578742D31222C227374617465223A225245434549564544222C22757064617465645F7473223A313830303030303030352E302C226C696E6573223A5B7B22736B75223A22534B552D31222C22717479223A327D5D7D');
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
INSERT INTO "readings" VALUES(1,'scale-a1',0,3,1,1800000001.0,1234.5,'A-01');
INSERT INTO "readings" VALUES(2,'scale-a1',0,3,2,1800000002.0,1234.5,'A-01');
INSERT INTO "readings" VALUES(3,'scale-a1',0,3,4,1800000004.0,1234.5,'A-01');
CREATE TABLE shelf_calibrations (shelf TEXT PRIMARY KEY, body BLOB NOT NULL);
INSERT INTO "shelf_calibrations" VALUES('A-01',X'7B22746172655F67223A31302E302C22756E69745F7765696768745F67223A6E756C6C2C227363616C655F666163746F72223A312E307D');
CREATE TABLE shelf_states (shelf TEXT PRIMARY KEY, body BLOB NOT NULL);
INSERT INTO "shelf_states" VALUES('A-01',X'7B22756E697473223A31322C22737461747573223A226F6B227D');
CREATE UNIQUE INDEX readings_identity ON readings (device, epoch, seq);
CREATE UNIQUE INDEX orders_external ON orders (channel, external_id);
CREATE INDEX orders_open ON orders (open) WHERE open = 1;
COMMIT;
