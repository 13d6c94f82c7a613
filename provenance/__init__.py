"""Provenance: what every run consumed and produced (record schema, catalog, local recorder, lineage, CLI)."""
