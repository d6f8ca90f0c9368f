"""The local console: web pages of endpoints (with metrics charts), requests, monitoring, job runs and the registry, on 127.0.0.1 (nbs/14a..14d)."""
