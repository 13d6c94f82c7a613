"""Shared pieces of moe-cpt: the `cpt` command line, user-facing errors, filesystem helpers."""
