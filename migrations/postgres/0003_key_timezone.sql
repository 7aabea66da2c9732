-- The time zone whose days and months a key's quotas count in (IANA name;
-- NULL means UTC).
ALTER TABLE api_keys ADD COLUMN timezone TEXT;
