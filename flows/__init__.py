"""Prefect flows: thin wiring of slimloop library calls, one entry point per DVC stage."""
