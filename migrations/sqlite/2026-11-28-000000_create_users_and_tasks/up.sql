-- Timestamps are UTC, stored by diesel as 'YYYY-MM-DD HH:MM:SS.ffffff' text (sorts in time order).
CREATE TABLE users (
    id            TEXT PRIMARY KEY NOT NULL,
    email         TEXT NOT NULL UNIQUE,
    name          TEXT,
    -- NULL for users who sign in through an external issuer (JWKS).
    password_hash TEXT,
    created_at    TIMESTAMP NOT NULL,
    updated_at    TIMESTAMP NOT NULL
);

CREATE TABLE tasks (
    id          INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    user_id     TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title       TEXT NOT NULL,
    description TEXT,
    completed   BOOLEAN NOT NULL DEFAULT 0,
    created_at  TIMESTAMP NOT NULL,
    updated_at  TIMESTAMP NOT NULL
);

-- Every task query is scoped to one owner.
CREATE INDEX tasks_user_id_created_at ON tasks (user_id, created_at);
