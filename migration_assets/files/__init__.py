"""File migration: files listed in `source_files` copied from FILES_SOURCE_ROOT to S3, by id ranges."""
