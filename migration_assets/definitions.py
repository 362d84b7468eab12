"""`defs`: every pipeline's definitions, with the resources they share."""

import dagster as dg

from migration_assets.blobs import definitions as blobs
from migration_assets.blobs.resources import BlobMigrationResource
from migration_assets.chain import definitions as chain
from migration_assets.chain.resources import ChainSourceResource
from migration_assets.core.resources import PostgresResource
from migration_assets.core.runs import freeze_loaded_objects
from migration_assets.files import definitions as files
from migration_assets.files.resources import FilesResource, FilesS3Resource
from migration_assets.repos import definitions as repos
from migration_assets.repos.resources import RepoSourceResource
from migration_assets.status import definitions as status


def shared_resources() -> dict:
    return {
        "postgres": PostgresResource(),
        "chain_source": ChainSourceResource(),
        "repo_source": RepoSourceResource(),
        "blob_migration": BlobMigrationResource(),
        "files": FilesResource(),
        "files_s3": FilesS3Resource(),  # endpoint, region and credentials from the standard AWS_* variables
    }


defs = dg.Definitions.merge(
    chain.defs, repos.defs, blobs.defs, files.defs, status.defs, dg.Definitions(resources=shared_resources())
)

freeze_loaded_objects()  # every process that loads this code location keeps what it built
