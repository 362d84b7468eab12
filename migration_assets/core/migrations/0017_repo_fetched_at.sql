-- When the repo was last fetched whole (getRepo). A gap in a stream (OutdatedCursor) hides only changes
-- made before the oldest event the host still keeps: a repo fetched after that event needs no resync.
-- Rows from before this column (NULL) count as fetched long ago.
ALTER TABLE repos ADD COLUMN fetched_at timestamptz;
