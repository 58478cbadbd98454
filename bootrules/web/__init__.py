"""The HTTP layer: the boot endpoints, /healthz and /metrics, the status page and its API.

`boot` answers /boot.ipxe and /ipxe as bare WSGI in front of Flask; `proxies` decides who
is asking; `status` is the status page (`templates/`, `static/`) and /api/; `snippet`
writes the rule to paste for an unknown machine. Imports `decide`, `state` and the
shared vocabulary; nothing here forks, binds or signals.
"""
