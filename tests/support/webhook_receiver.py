#!/usr/bin/env python3
"""A webhook receiver for Mailroom's tests. Signatures are checked with the
Standard Webhooks project's own library (`standardwebhooks` from PyPI).

POST /_config {"secrets": [...], "script": [500, 500, 200, ...]} sets the
secrets to verify with (each must verify on its own) and the statuses to
answer with, in order (then 200). A 3xx answer carries a Location header.
`--secret` (repeatable) sets the secrets from the start, so a receiver
that comes back after an outage verifies the very first retry.
POST /hook receives events. GET /_received lists what arrived.
"""
import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook

STATE = {"secrets": [], "script": [], "received": []}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", headers=None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        with LOCK:
            body = json.dumps(STATE["received"]).encode()
        self.reply(200, body, {"content-type": "application/json"})

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        if self.path == "/_config":
            cfg = json.loads(body)
            with LOCK:
                STATE["secrets"] = cfg.get("secrets", [])
                STATE["script"] = list(cfg.get("script", []))
            return self.reply(204)
        headers = {k.lower(): v for k, v in self.headers.items()}
        with LOCK:
            secrets = list(STATE["secrets"])
            status = STATE["script"].pop(0) if STATE["script"] else 200
        verified = []
        for s in secrets:
            try:
                Webhook(s).verify(body, headers)
                verified.append(s)
            except Exception:
                pass
        record = {
            "id": headers.get("webhook-id"),
            "timestamp": headers.get("webhook-timestamp"),
            "signature": headers.get("webhook-signature"),
            "verified_with": verified,
            "status": status,
            "body": json.loads(body) if body else None,
        }
        with LOCK:
            STATE["received"].append(record)
        extra = {"location": "http://127.0.0.1:9/elsewhere"} if 300 <= status < 400 else {}
        if status in (429, 503):
            extra["retry-after"] = "1"
        self.reply(status, b"ok" if status < 300 else b"no", extra)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--secret", action="append", default=[],
                   help="verify with this secret from the first request on")
    a = p.parse_args()
    STATE["secrets"] = a.secret
    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    print("READY", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
