-- A followed host whose stream carried a commit of a repo hosted elsewhere is a relay: a gap in its
-- stream (OutdatedCursor) may hide any repo's changes, where a PDS's hides only its own repos'.
ALTER TABLE repo_stream_cursors ADD COLUMN relay boolean NOT NULL DEFAULT false;
