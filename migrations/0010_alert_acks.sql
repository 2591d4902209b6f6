-- Who acknowledged an alert, and when (`keywarden alerts ack`): acknowledged alerts leave
-- `status`.
ALTER TABLE alerts ADD COLUMN acked_at INTEGER;
ALTER TABLE alerts ADD COLUMN acked_by TEXT;
