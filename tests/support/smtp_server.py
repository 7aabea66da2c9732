#!/usr/bin/env python3
"""A real SMTP server for Mailroom's tests (aiosmtpd, which we did not write).

Replies are scripted by the recipient's local part:
  bounce*@    550 5.1.1 user unknown (hard bounce)
  reject*@    554 5.7.1 rejected (permanent, not a hard bounce)
  defer*@     451 4.7.1 always (transient)
  flakyN-*@   451 for the first N attempts at that address, then accepted
  slowMS-*@   accepted after sleeping MS milliseconds in DATA
A sender whose local part starts with "hangup" gets 554 5.7.1 at MAIL and
the connection closed at once.
Everything accepted is parsed with Python's email package and served as JSON
at GET http://127.0.0.1:<control-port>/messages.

It advertises PIPELINING (RFC 2920), as Postfix, Exim and the hosted relays
do, and counts the transactions whose RCPT had already arrived when MAIL was
answered ("pipelined" at the control port).

Options: --port, --control-port, --tls none|starttls|implicit, --certdir DIR
(a throwaway CA from trustme is written to DIR/ca.pem), --auth user:pass,
--no-pipelining (do not advertise PIPELINING).
"""
import argparse
import asyncio
import base64
import collections
import email
import email.policy
import json
import os
import re
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

RECEIVED = []
ATTEMPTS = collections.Counter()
PIPELINED = collections.Counter()
LOCK = threading.Lock()


def parse(envelope_from, rcpt, data):
    msg = email.message_from_bytes(data, policy=email.policy.default)
    text = html = None
    attachments = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        disposition = part.get_content_disposition()
        if disposition == "attachment":
            payload = part.get_payload(decode=True) or b""
            attachments.append({
                "filename": part.get_filename(),
                "content_type": part.get_content_type(),
                "content_b64": base64.b64encode(payload).decode(),
            })
        elif part.get_content_type() == "text/plain" and text is None:
            text = part.get_content()
        elif part.get_content_type() == "text/html" and html is None:
            html = part.get_content()
    return {
        "mail_from": envelope_from,
        "rcpt_to": rcpt,
        "subject": str(msg["subject"] or ""),
        "from": str(msg["from"] or ""),
        "to": str(msg["to"] or ""),
        "cc": str(msg["cc"] or ""),
        "bcc_header": msg["bcc"] is not None,
        "message_id": str(msg["message-id"] or ""),
        "headers": {k: str(v) for k, v in msg.items()},
        "text": text,
        "html": html,
        "attachments": attachments,
        "raw_b64": base64.b64encode(data).decode(),
        "received_at": time.time(),
    }


class Handler:
    def __init__(self, pipelining):
        self.pipelining = pipelining

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        # The client's next command is already buffered: it did not wait.
        ahead = len(getattr(server._reader, "_buffer", b"")) > 0
        with LOCK:
            PIPELINED["pipelined" if ahead else "stepwise"] += 1
        if address.split("@", 1)[0].lower().startswith("hangup"):
            # Refuse the sender and hang up before reading anything else.
            await server.push("554 5.7.1 <%s>: Sender rejected" % address)
            server.transport.close()
            return "554 5.7.1 closed"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@", 1)[0].lower()
        with LOCK:
            ATTEMPTS[address.lower()] += 1
            n = ATTEMPTS[address.lower()]
        if local.startswith("bounce"):
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        if local.startswith("reject"):
            return "554 5.7.1 <%s>: Relay access denied" % address
        if local.startswith("defer"):
            return "451 4.7.1 <%s>: Try again later" % address
        m = re.match(r"flaky(\d+)-", local)
        if m and n <= int(m.group(1)):
            return "451 4.3.0 <%s>: Temporary failure %d" % (address, n)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        for rcpt in envelope.rcpt_tos:
            m = re.match(r"slow(\d+)-", rcpt.split("@", 1)[0].lower())
            if m:
                await asyncio.sleep(int(m.group(1)) / 1000)
        record = parse(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content or envelope.content)
        with LOCK:
            RECEIVED.append(record)
        return "250 2.0.0 Ok: queued as %d" % len(RECEIVED)


class Control(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        with LOCK:
            body = json.dumps({"messages": RECEIVED, "attempts": dict(ATTEMPTS),
                               "transactions": dict(PIPELINED)}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--control-port", type=int, required=True)
    p.add_argument("--tls", default="none", choices=["none", "starttls", "implicit"])
    p.add_argument("--certdir")
    p.add_argument("--auth")
    p.add_argument("--no-pipelining", action="store_true")
    a = p.parse_args()

    kwargs = {"hostname": "127.0.0.1", "port": a.port, "decode_data": False,
              "data_size_limit": 50 * 1024 * 1024}
    if a.tls != "none":
        import trustme
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        ca.cert_pem.write_to_path(os.path.join(a.certdir, "ca.pem"))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        if a.tls == "starttls":
            kwargs["tls_context"] = ctx
            kwargs["require_starttls"] = True
        else:
            kwargs["ssl_context"] = ctx
            kwargs["server_hostname"] = "localhost"
    if a.auth:
        user, password = a.auth.split(":", 1)

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = isinstance(auth_data, LoginPassword) and \
                auth_data.login.decode() == user and auth_data.password.decode() == password
            return AuthResult(success=ok)

        kwargs["authenticator"] = authenticator
        kwargs["auth_required"] = True
        # With implicit TLS the whole session is encrypted; aiosmtpd only
        # recognises STARTTLS sessions as TLS for auth_require_tls.
        kwargs["auth_require_tls"] = a.tls == "starttls"
    controller = Controller(Handler(not a.no_pipelining), **kwargs)
    controller.start()
    control = ThreadingHTTPServer(("127.0.0.1", a.control_port), Control)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    print("READY", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
