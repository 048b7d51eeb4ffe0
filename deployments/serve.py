"""Serve the deployments declared in ``deployments/prefect.yaml`` from one process.

The simplest way to run ``customize_dataset`` from the Prefect UI on one machine: no work pool,
no worker. Stop it with Ctrl-C (Prefect pauses the served deployments on shutdown).

    .venv/bin/python deployments/serve.py            # uses PREFECT_API_URL, or starts a local
                                                     # server on 127.0.0.1:4200
    .venv/bin/prefect deployment run customize-dataset/customize-dataset
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from flows.deploy import PREFECT_FILE, serve_all
from flows.server import DEFAULT_PORT, ensure_server


def main(argv: list[str] | None = None) -> None:
    """Start (or reuse) the Prefect server, then serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefect-file", type=Path, default=PREFECT_FILE,
                        help="the deployment declarations (default: deployments/prefect.yaml)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port of the local Prefect server started when PREFECT_API_URL "
                             "is unset or does not answer")
    parser.add_argument("--limit", type=int, default=None,
                        help="most flow runs at once (default: no limit)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    server = ensure_server(port=args.port)
    logging.getLogger("eqdiff.serve").info("Prefect UI: %s", server.ui_url)
    serve_all(args.prefect_file, limit=args.limit)


if __name__ == "__main__":
    main()
