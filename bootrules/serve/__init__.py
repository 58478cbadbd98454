"""Serving: the process model and the HTTP servers inside it.

`launch` binds the socket and runs one process or a parent, a leader per version of the
rules and its workers; `generations` is that parent; `waitress_loop` and `granian_worker`
are the two HTTP servers a worker can run, each the only door to its server's internals.
"""
