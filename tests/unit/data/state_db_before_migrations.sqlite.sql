-- The state DB's tables as backupd made them before it had migrations (SQLModel 0.0.45+
-- create_all on sqlite): what revision 0001 reproduces, and what a DB made then holds.

CREATE TABLE job_session (
    id INTEGER NOT NULL,
    job VARCHAR NOT NULL,
    state VARCHAR(16) NOT NULL,
    result VARCHAR(16),
    message VARCHAR,
    "full" BOOLEAN NOT NULL,
    stop_mode VARCHAR(16),
    stop_message VARCHAR,
    stop_requested_at DATETIME,
    created_at DATETIME NOT NULL,
    started_at DATETIME,
    ended_at DATETIME,
    owner_host VARCHAR,
    owner_pid INTEGER,
    heartbeat_at DATETIME,
    PRIMARY KEY (id)
);

CREATE INDEX ix_job_session_job ON job_session (job);

CREATE TABLE vm_lock (
    "key" VARCHAR NOT NULL,
    session_id INTEGER NOT NULL,
    acquired_at DATETIME NOT NULL,
    PRIMARY KEY ("key")
);

CREATE TABLE session_log (
    id INTEGER NOT NULL,
    session_id INTEGER NOT NULL,
    at DATETIME NOT NULL,
    level VARCHAR NOT NULL,
    vm VARCHAR,
    text VARCHAR NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY(session_id) REFERENCES job_session (id)
);

CREATE INDEX ix_session_log_session_id ON session_log (session_id);

CREATE TABLE vm_task (
    id INTEGER NOT NULL,
    session_id INTEGER NOT NULL,
    position INTEGER NOT NULL,
    vm VARCHAR NOT NULL,
    status VARCHAR(16) NOT NULL,
    stage VARCHAR,
    mode VARCHAR,
    bytes_read INTEGER NOT NULL,
    bytes_total INTEGER NOT NULL,
    bytes_stored INTEGER NOT NULL,
    restore_point VARCHAR,
    snapshot_id VARCHAR,
    snapshot_removed BOOLEAN NOT NULL,
    snapshot_error VARCHAR,
    error VARCHAR,
    warning VARCHAR,
    started_at DATETIME,
    ended_at DATETIME,
    PRIMARY KEY (id),
    FOREIGN KEY(session_id) REFERENCES job_session (id)
);

CREATE INDEX ix_vm_task_session_id ON vm_task (session_id);
