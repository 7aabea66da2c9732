"""Verifies the DKIM signature of a message with dkimpy (PyPI `dkimpy`).

usage: dkim_verify.py MESSAGE_FILE NAME=TXT...

Each NAME=TXT is a DNS TXT record (e.g. `s1._domainkey.example.com=v=DKIM1; k=rsa; p=...`)
served to dkimpy instead of DNS. Prints `pass` or `fail` and exits 0 either way
(exit 2 on usage errors), so the caller decides what it expected.
"""
import sys

import dkim


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    message = open(sys.argv[1], "rb").read()
    records = {}
    for arg in sys.argv[2:]:
        name, _, txt = arg.partition("=")
        records[name.rstrip(".").lower()] = txt.encode()

    def dnsfunc(name, timeout=5):
        key = name.decode() if isinstance(name, bytes) else name
        return records.get(key.rstrip(".").lower())

    print("pass" if dkim.verify(message, dnsfunc=dnsfunc) else "fail")


if __name__ == "__main__":
    main()
