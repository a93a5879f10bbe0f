"""Archive writer: every upload of every till, written once into the append-only archive."""
