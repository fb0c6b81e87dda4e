"""Bespoke benchmark, pilot and diagnostic scripts, run as modules: ``python -m bench.dev.NAME``."""
