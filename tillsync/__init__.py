"""The ``tillsync`` command line: setup, services, the demo, ops and till commands."""
