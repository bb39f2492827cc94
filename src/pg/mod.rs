//! Managed PostgreSQL and migrations (blocking; runs on the main thread before shards start).
