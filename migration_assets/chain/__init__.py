"""Chain data: block metadata and events from chainstorage's DynamoDB tables to PostgreSQL."""
