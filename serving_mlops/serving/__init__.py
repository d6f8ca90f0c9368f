"""A serving runtime that answers the Databricks serving-endpoints REST API on loopback: protocol, models, capture, metrics, runtime, app, process (nbs/08a..08g)."""
