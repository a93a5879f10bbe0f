"""The tillsync services; each sub-package is one service."""
