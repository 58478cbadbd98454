"""Deciding: which rule answers a machine, and the script it gets.

`matching` indexes the rules and finds the first that matches (pure, no Flask, no I/O);
`render` writes one small iPXE script per action; `engine.Snapshot` is one loaded version
of the rules with its index and scripts; `reloader` follows the rules file and swaps
Snapshots; `lint` finds rules that can never match, for `check`. Imports `rules` and the
shared vocabulary, never `state`, `web` or `serve`.
"""
