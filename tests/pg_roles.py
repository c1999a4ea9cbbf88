"""A PostgreSQL role that may only read one schema: an auditor's (tests that need one)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


@contextmanager
def select_only_url(schema: str) -> Iterator[str]:
    """A URL for ``schema`` as a new login role with USAGE on it and SELECT on its tables;
    the schema and the role are dropped afterwards."""
    import psycopg

    role = f"auditor_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
        conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"')
    try:
        yield f"postgresql://{role}@127.0.0.1:5432/test?schema={schema}"
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
            conn.execute(f'DROP OWNED BY "{role}"')
            conn.execute(f'DROP ROLE "{role}"')
