-- Sessions end by count, not by time. Every password change adds one to token_generation, in
-- the UPDATE that stores the new hash; this server's tokens carry the generation they were
-- issued in (claim `gen`), and a local token is good only for its account's current one. (A
-- time, tokens_not_before, could not do it: a login that had read the old hash could sign its
-- token after the change, and two changes within one second looked alike.)
ALTER TABLE users ADD COLUMN token_generation BIGINT NOT NULL DEFAULT 0;
-- Tokens issued before this migration carry no `gen` and count as generation 0: they keep
-- working for accounts whose password never changed, and stop for those whose password did.
UPDATE users SET token_generation = 1 WHERE tokens_not_before > 0;
ALTER TABLE users DROP COLUMN tokens_not_before;
