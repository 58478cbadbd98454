"""What bootrules remembers about machines: `once:` state and the machines seen.

`store` runs the SQL on SQLite or PostgreSQL; `once` decides whether a `once:` rule still
answers a machine and takes the done callbacks; `tokens` makes and checks the signed
tokens; `arming` writes armed rows in batches; `machines` and `recorder` keep the machines
seen, off the request path. Imports the shared vocabulary only.
"""
