"""The DynamoDB source of the chain pipeline, as a Dagster resource."""

from functools import cached_property
from typing import Any

from dagster_aws.utils import ResourceWithBoto3Configuration
from psycopg_pool import ConnectionPool
from pydantic import Field, PrivateAttr

from migration_assets.chain.settings import CHAIN_MIGRATIONS, ChainSettings
from migration_assets.core.aws import DynamoClientSpec
from migration_assets.core.postgres import shared_pool
from migration_assets.core.resources import PostgresResource


def network_pool(postgres: PostgresResource, schema: str | None) -> ConnectionPool:
    """The pool of a network's PostgreSQL schema (its connections' search_path), its chain tables made
    on first use; schema None: the shared pool of the default schema."""
    if schema is None:
        return postgres.pool()
    return shared_pool(postgres.resolved_url(), postgres.pool_size, schema, migrations=CHAIN_MIGRATIONS)


# Resource fields whose defaults are the CHAIN_* settings of the same name.
_FROM_SETTINGS = ("block_table", "block_tag", "event_table", "event_tag", "read_concurrency", "read_processes")


class ChainSourceResource(ResourceWithBoto3Configuration):
    """chainstorage's DynamoDB tables. A field left unset takes its CHAIN_* value when the resource is
    built, so the UI shows the configuration runs will use; `endpoint_url` comes from
    AWS_ENDPOINT_URL_DYNAMODB, credentials from the standard AWS chain."""

    block_table: str = Field(description="DynamoDB block table (CHAIN_BLOCK_TABLE)")
    block_tag: int = Field(description="block tag to migrate (CHAIN_BLOCK_TAG)")
    event_table: str = Field(description="DynamoDB event table of the event tag (CHAIN_EVENT_TABLE)")
    event_tag: int = Field(description="event tag to migrate, 0: legacy layout (CHAIN_EVENT_TAG)")
    read_concurrency: int = Field(description="DynamoDB requests in flight per run (CHAIN_READ_CONCURRENCY)")
    read_processes: int = Field(description="worker processes reading; 1 reads in threads only (CHAIN_READ_PROCESSES)")
    max_attempts: int = Field(default=10, description="botocore attempts per DynamoDB request")
    _client: Any = PrivateAttr(default=None)

    def __init__(self, **config: Any):
        env = ChainSettings.load()
        given = {name: value for name, value in config.items() if value is not None}
        super().__init__(**{name: getattr(env, name) for name in _FROM_SETTINGS} | given)

    @cached_property
    def settings(self) -> ChainSettings:
        """The CHAIN_* settings with this resource's values in their place (validated alike)."""
        return ChainSettings.load(**{name: getattr(self, name) for name in _FROM_SETTINGS})

    def client_spec(self) -> DynamoClientSpec:
        return DynamoClientSpec(
            region_name=self.region_name, endpoint_url=self.endpoint_url, profile_name=self.profile_name,
            aws_access_key_id=self.aws_access_key_id, aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token, use_ssl=self.use_ssl, verify=self.verify,
            max_attempts=self.max_attempts, max_pool_connections=self.read_concurrency + 4,
        )

    def client(self) -> Any:
        """One thread-safe boto3 client per resource, its connection pool sized for the concurrency."""
        if self._client is None:
            self._client = self.client_spec().make()
        return self._client
