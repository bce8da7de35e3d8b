# -*- coding: utf-8 -*-
"""Loopback-only Autobahn echo server, for trying the harness without pushfleet.

Python 2.7: run it with the venv made by setup.sh, e.g.

    .venv-autobahn/bin/python tests/autobahn/echoserver.py --port 9001

`wstest -m echoserver` listens on every interface and does not negotiate
permessage-deflate (so 12.*/13.* come out UNIMPLEMENTED). This script binds
127.0.0.1 only and, unless --no-deflate is given, uses Autobahn's own testee
server (autobahntestsuite.testee), which echoes and accepts permessage-deflate
offers the way Autobahn does. With --no-deflate it is exactly the
`wstest -m echoserver` protocol (autobahntestsuite.echo), bound to loopback.
It exits by itself after --max-seconds.
"""
from __future__ import print_function

import argparse
import sys
import warnings

warnings.filterwarnings("ignore")

# autobahntestsuite installs the best Twisted reactor (epoll) on import; it must
# come before anything imports twisted.internet.reactor.
import autobahntestsuite  # noqa: E402,F401
from twisted.internet import reactor  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind (loopback only; default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=9001)
    ap.add_argument("--no-deflate", action="store_true",
                    help="plain `wstest -m echoserver` behaviour: no permessage-deflate")
    ap.add_argument("--max-seconds", type=float, default=3600.0,
                    help="stop after this many seconds (default 3600)")
    args = ap.parse_args()

    if not (args.host.startswith("127.") or args.host in ("localhost", "::1")):
        ap.error("refusing to bind a non-loopback address: %s" % args.host)

    url = "ws://%s:%d" % (args.host, args.port)
    if args.no_deflate:
        from autobahntestsuite.echo import EchoServerFactory
        factory = EchoServerFactory(url)
        kind = "echo (no permessage-deflate)"
    else:
        from autobahntestsuite.testee import TesteeServerFactory
        factory = TesteeServerFactory(url)
        kind = "testee echo (permessage-deflate enabled)"

    host = "127.0.0.1" if args.host == "localhost" else args.host
    reactor.listenTCP(args.port, factory, interface=host)
    reactor.callLater(args.max_seconds, reactor.stop)
    print("echoserver: %s listening on %s (stops after %ds)" % (kind, url, args.max_seconds))
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
