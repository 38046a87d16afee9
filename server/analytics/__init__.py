"""Stream analytics: Prometheus metrics, the SQLite request log, live snapshots.

Everything is fed once per ended stream (a `StreamRecord`) plus one tick per second with the
live counts; nothing here runs per token.
"""
