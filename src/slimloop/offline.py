"""The environment that keeps every run offline and quiet: no telemetry, no waiting on the internet."""

# Entry points (flows.common) and the commands of the nightly run set these unless the user did.
OFFLINE_ENV = {
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "MPLBACKEND": "Agg",
}
