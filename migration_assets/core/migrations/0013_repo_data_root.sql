-- Each repo's current MST root (the `data` CID of the commit stored), set by every full sync and every
-- applied stream commit: a #commit whose `prevData` is not this root doesn't follow the stored repo, which
-- is then resynced. NULL (stored before this column): only the event's `since` is checked, until the next sync.
ALTER TABLE repos ADD COLUMN data_cid text;
