"""Sinks (LanceDB, Parquet) with their commit protocol, and search over what they wrote."""
