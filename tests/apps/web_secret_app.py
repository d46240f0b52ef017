"""The app of tests/test_web_secret_url.py, served by ``kew serve``: one task
queue, ``secret.echo$SECRET_APP_SUFFIX``, on ``$SECRET_APP_URL`` (a broker URL
with a password); the task store is SQLite in ``$SECRET_APP_DIR``."""

import os
from pathlib import Path

import msgspec

from kew.task import App

DIR = Path(os.environ.get("SECRET_APP_DIR", "."))
SUFFIX = os.environ.get("SECRET_APP_SUFFIX", "")

app = App(
    os.environ["SECRET_APP_URL"],
    name="secrettest",
    store=f"sqlite:///{DIR / 'tasks.sqlite3'}",
    events_queue=f"secret.events{SUFFIX}",
)


class Item(msgspec.Struct):
    n: int


@app.task(f"secret.echo{SUFFIX}")
def echo(item: Item) -> None:
    pass
