DROP TABLE login_throttle;
ALTER TABLE users DROP COLUMN tokens_not_before;
ALTER TABLE users DROP COLUMN issuer;
