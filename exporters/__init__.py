"""Transport and storage: OTLP receivers, the Store, the schema and the SQL endpoint.

Importing this package loads no heavy dependency; chDB and clickhouse-connect
are imported when a store is opened, with an error naming the ``server`` extra
when they are missing.
"""

from .chdb_store import ChdbStore
from .clickhouse_store import ClickHouseStore
from .ingest import Ingestor, Saturated, Ticket
from .sampling_config import SamplingConfig
from .schema import METRIC_TABLES, TABLES, SchemaOptions
from .service import Service, open_configured_store
from .store import QueryResult, Store, open_store

__all__ = [
    "ChdbStore",
    "ClickHouseStore",
    "Ingestor",
    "METRIC_TABLES",
    "QueryResult",
    "SamplingConfig",
    "Saturated",
    "SchemaOptions",
    "Service",
    "Store",
    "TABLES",
    "Ticket",
    "open_configured_store",
    "open_store",
]
