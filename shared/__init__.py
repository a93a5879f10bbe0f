"""Code shared by the tillsync services and the till agent."""
