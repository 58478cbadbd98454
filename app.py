"""bootrules: tell network-booting machines what to do, from the ordered rules in rules.yaml.

    python app.py serve                   # serve ./rules.yaml on 127.0.0.1:8080
    python app.py check rules.yaml        # validate, listing every problem as file:line
    python app.py preview --mac 00:11:22:33:44:55   # print the script that machine gets

`create_app()` builds the WSGI app, so `waitress-serve --call app:create_app` and
`flask --app app run` work too; they read the settings from BOOTRULES_* variables.
Where things live: README, "Where things live".
"""

from bootrules.application import create_app
from bootrules.cli import cli

__all__ = ["cli", "create_app"]

if __name__ == "__main__":
    cli()
