"""``python -m examples.omero_import [serve|worker|all]``: run the service.

``serve``: the HTTP front end (``POST /ome/import``, status URIs, kew.web's
monitoring API and page) with uvicorn on ``[web] host:port``; ``worker``:
the workers (like ``kew worker examples.omero_import.service:app``);
``all`` (the default): both in one process.  The configuration is the file
named by ``KEW_OMERO_CONFIG`` with ``KEW_OMERO_*`` overrides; a bad one
stops start-up with the reason.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from .config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.omero_import")
    parser.add_argument("mode", nargs="?", choices=("serve", "worker", "all"), default="all")
    parser.add_argument("--config", help="TOML file (default: $KEW_OMERO_CONFIG)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(args.config)
        from .service import OmeroImportService

        svc = OmeroImportService(config)
    except ConfigError as e:
        print(f"omero-import: {e}", file=sys.stderr)
        return 2
    worker = None
    recorder = None
    try:
        if args.mode in ("worker", "all"):
            worker = svc.app.worker(concurrency=config.import_.concurrency, record=True)
        if args.mode == "worker":
            assert worker is not None
            worker.run()
            return 0
        import uvicorn

        from .web import create_web

        if worker is not None:
            worker.start()
        else:
            recorder = svc.app.recorder()  # task status and output reach the store
        # uvicorn stops on SIGTERM/SIGINT, then raises the signal again for
        # the previous handler: make that one a no-op so we clean up, exit 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: None)
        uvicorn.run(create_web(svc), host=config.web.host, port=config.web.port)
        if recorder is not None:
            recorder.stop()
        return 0
    finally:
        if worker is not None and args.mode == "all":
            worker.stop(30)
        svc.close()


if __name__ == "__main__":
    sys.exit(main())
