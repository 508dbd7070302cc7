"""A webhook sink for the compose stack: prints every POST it receives as one JSON line.

Alertmanager's webhook receiver and Stethoscope's signed webhook notifier both post here,
so ``docker compose logs -f webhook-sink`` shows what on-call would have received.
When ``STETHOSCOPE_WEBHOOK_SECRET`` is set, requests carrying Stethoscope's signature
headers are verified with :func:`stethoscope.alerts.signing.verify` and the line says
whether the signature held. Stdlib only, apart from that optional check.

Usage: ``python sink.py [--host 0.0.0.0] [--port 8080]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SIGNATURE_HEADER = "X-Stethoscope-Signature"


def _signature_status(headers, body: bytes) -> str:
    secret = os.environ.get("STETHOSCOPE_WEBHOOK_SECRET", "")
    if headers.get(SIGNATURE_HEADER) is None:
        return "absent"
    if not secret:
        return "unchecked (STETHOSCOPE_WEBHOOK_SECRET unset)"
    try:
        from stethoscope.alerts.signing import SignatureError, verify
    except ImportError:
        return "unchecked (stethoscope not installed)"
    try:
        verify(secret, dict(headers.items()), body, time.time())
    except SignatureError as exc:
        return f"invalid: {exc}"
    return "valid"


class SinkHandler(BaseHTTPRequestHandler):
    server_version = "stethoscope-webhook-sink"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        try:
            payload = json.loads(body or b"null")
        except ValueError:
            payload = body.decode("utf-8", "replace")
        line = {"path": self.path, "signature": _signature_status(self.headers, body), "payload": payload}
        sys.stdout.write(json.dumps(line, sort_keys=True) + "\n")
        sys.stdout.flush()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        ok = self.path == "/healthz"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args) -> None:  # one JSON line per request is enough
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    args = p.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), SinkHandler)
    sys.stderr.write(f"webhook sink listening on http://{args.host}:{server.server_address[1]}\n")
    sys.stderr.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
