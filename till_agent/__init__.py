"""The till agent: local store with outbox, upload relay and account requests of one till."""
