"""Storage shared beyond one call: PostgreSQL connections, and the claims that make a callback act once.

Out of the call core on purpose: the core decides, and keeps nothing beyond one call. The
pharmacy's store (pharmacy_functions.py) keeps its orders on ``postgres.PostgresConnections``;
the bridge keeps its claims (``claims``) in the same database when there is one.
"""
