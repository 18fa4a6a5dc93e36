"""The flywheel's human review page (and table browser).

    FLYWHEEL_REVIEW_TOKEN=... python jobs/review_server.py --config configs/flywheel.yaml --port 8080

Sign in with the token (review.token in the config, or $FLYWHEEL_REVIEW_TOKEN) and a reviewer name.
Bind to 127.0.0.1 (default) behind a TLS-terminating proxy when others reach it.
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401

from common.typed_config import ConfigError, parse_assignment


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args(argv)
    try:
        from flywheel.config import load_config
        from flywheel.review.app import create_app

        app = create_app(load_config(args.config, dict(parse_assignment(s) for s in args.set)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
