-- Collection filters: what each repo's stored records were made under, so a changed REPO_COLLECTIONS or
-- REPO_SIGNAL_COLLECTION makes the repos stored under another one due again (widening backfills the newly
-- included collections, narrowing deletes the excluded ones).
ALTER TABLE repos ADD COLUMN collections_filter text;     -- RecordScope.key at the last store; '*' = all
ALTER TABLE repos ADD COLUMN signal_missing boolean NOT NULL DEFAULT false;  -- no record in the signal collection: none stored
UPDATE repos SET collections_filter = '*' WHERE head IS NOT NULL;  -- stored before filters existed: everything
-- Range scans (< key, > key) find the few repos stored under another filter without reading them all.
CREATE INDEX repos_collections_filter ON repos (collections_filter) WHERE status = 'synced';
