ALTER TABLE users ADD COLUMN tokens_not_before BIGINT NOT NULL DEFAULT 0;
-- Accounts whose password ever changed end every session open now, to be safe.
UPDATE users SET tokens_not_before = CAST(strftime('%s', 'now') AS INTEGER) + 1
    WHERE token_generation > 0;
ALTER TABLE users DROP COLUMN token_generation;
