-- Who vouches for each account: NULL for a local account (registered here, with a password);
-- its issuer (JWT_ISSUER, else the JWK Set URL) for one created from an external token.
-- An external token only ever reaches accounts its own issuer created.
ALTER TABLE users ADD COLUMN issuer TEXT;
-- Accounts created from external tokens before issuers were recorded: the first verified
-- external token pins its issuer (see `AppState::user_for`).
UPDATE users SET issuer = '' WHERE password_hash IS NULL;

-- Tokens issued (`iat`) before this Unix second are refused: a password change moves it, which
-- ends every session opened with the old password.
ALTER TABLE users ADD COLUMN tokens_not_before BIGINT NOT NULL DEFAULT 0;

-- Failed-login limits, shared by every server process on this database and kept across
-- restarts. One row per bucket (an email, a client address, a user changing a password): the
-- attempts taken in the window that started at window_started_ms (Unix milliseconds).
CREATE TABLE login_throttle (
    bucket            TEXT PRIMARY KEY,
    window_started_ms BIGINT NOT NULL,
    attempts          INTEGER NOT NULL
);
