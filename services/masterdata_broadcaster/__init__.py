"""The master-data broadcaster: judges master-data changes, keeps the feed, serves catch-ups."""
