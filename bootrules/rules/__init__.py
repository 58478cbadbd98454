"""Reading rules.yaml: from bytes to a frozen RuleSet, or every problem at once as `file:line`.

`loader` reads the document and each rule; one module per part of a rule (`match`,
`ipxe_settings`, `once`, `actions`, `menu`) checks its key; `ipxe_syntax` says what an iPXE
command line can hold. Imports only the shared vocabulary at the top of the package
(`model`, `values`, `errors`), never the other wings.
"""
