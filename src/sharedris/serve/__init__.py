"""`sharedris serve`: the HTTP API and the one-page demo (needs the ``serve`` extra)."""
