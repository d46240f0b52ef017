"""``kew serve MODULE:APP``: the REST API and monitoring page under uvicorn,
with the app's recorder (and optionally a worker) in the same process."""

from __future__ import annotations

import logging
from typing import Any

import click

from kew.qchan.spi import KewError

log = logging.getLogger("kew.web")


@click.command("serve")
@click.argument("app_spec", metavar="MODULE:APP")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Web configuration (TOML or YAML): tokens, limits. Environment overrides it.",
)
@click.option(
    "--recorder/--no-recorder",
    default=None,
    help="Record task events into the store in this process (default: on).",
)
@click.option(
    "--worker",
    "worker_concurrency",
    type=click.IntRange(min=0),
    default=None,
    help="Also run a worker with N threads in this process (default 0: none).",
)
@click.option(
    "--root-path",
    default=None,
    metavar="PATH",
    help="Path prefix the server is reached under behind a reverse proxy (e.g. /kew); "
    "every link starts with it. Requests with or without it are both served.",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    envvar="KEW_LOG_FORMAT",
    default="text",
    show_default=True,
    help="'json': one JSON object per line (time, level, logger, message, exc_info), "
    "uvicorn's lines included. $KEW_LOG_FORMAT.",
)
def serve(
    app_spec: str,
    host: str,
    port: int,
    config_path: str | None,
    recorder: bool | None,
    worker_concurrency: int | None,
    root_path: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Serve the REST API and monitoring page of MODULE:APP."""
    import uvicorn

    from kew.cli import fail, load_app, setup_logging
    from kew.web._state import web_state
    from kew.web.app import create_app
    from kew.web.config import load_config, normalize_root

    setup_logging(log_level, log_format)

    try:
        config = load_config(config_path)
    except KewError as e:
        fail(str(e))
    if recorder is not None:
        config.recorder = recorder
    if worker_concurrency is not None:
        config.worker_concurrency = worker_concurrency
    if root_path is not None:
        try:
            config.root_path = normalize_root(root_path)
        except KewError as e:
            fail(str(e))
    if not config.tokens:
        fail(
            "no API tokens configured: set KEW_WEB_ADMIN_TOKENS / KEW_WEB_READ_TOKENS, "
            "or list tokens in --config (every endpoint but /health needs one)"
        )
    app: Any = load_app(app_spec)
    try:
        from kew.task import metrics

        metrics.install(app)
    except ImportError:  # prometheus_client missing: /metrics serves the default registry
        pass
    asgi = create_app(app, config)
    if log_format == "json":  # Litestar set up logging its own way: one JSON stream wins
        setup_logging(log_level, log_format, adopt=["litestar"])
    running: list[Any] = []
    try:
        if config.recorder:
            running.append(app.recorder())
        if config.worker_concurrency:
            worker = app.worker(concurrency=config.worker_concurrency)
            worker.start()
            running.append(worker)
            worker_id = getattr(worker, "id", None)
            if isinstance(worker_id, str):
                web_state(asgi.state).local_workers[worker_id] = config.worker_concurrency
        banner = (
            f"kew: serving {app_spec} on http://{host}:{port}{config.root_path}/ "
            f"(page: {config.root_path}/ui; queue depths sampled every "
            f"{config.sample_seconds:g} s for the charts)"
        )
        # JSON: uvicorn's loggers go to the root handler (no config of their own)
        json_logs = log_format == "json"
        if json_logs:
            log.info("%s", banner)
        else:
            click.echo(banner, err=True)
        extra: dict[str, Any] = {"log_config": None} if json_logs else {}
        uvicorn.run(
            asgi,
            host=host,
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=5,
            **extra,
        )
    except KewError as e:
        fail(str(e))
    finally:
        for r in reversed(running):
            try:
                r.stop(10.0)
            except Exception:
                log.exception("kew serve: stopping %r failed", r)
        close = getattr(app, "close", None)
        if close is not None:
            close()
