#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""A small QMP client for the boot tests (the migration case).

    qmp.py SOCKET COMMAND [JSON-ARGUMENTS]   run one command, print its "return" as JSON
    qmp.py SOCKET --wait-migration SECONDS   poll query-migrate until it completed, failed
                                             or was cancelled; print the final status
                                             (exit 1 if it is not "completed")
    qmp.py SOCKET --wait-active SECONDS      poll until the migration is active and has
                                             sent some RAM (exit 1 if it ended first)

Exit status 2 on a QMP error or when SECONDS pass; the error goes to stderr.
"""

import json
import socket
import sys
import time


class Qmp:
    def __init__(self, path, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.read()  # greeting
        self.cmd("qmp_capabilities")

    def read(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("QMP connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self.read()
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error'].get('desc', r['error'])}")
            return r.get("return")


def wait(q, seconds, done):
    deadline = time.monotonic() + seconds
    while True:
        info = q.cmd("query-migrate")
        verdict = done(info)
        if verdict is not None:
            return verdict, info
        if time.monotonic() > deadline:
            raise TimeoutError(f"migration still {info.get('status')} after {seconds} s")
        time.sleep(0.1)


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    q = Qmp(argv[1])
    if argv[2] == "--wait-migration":
        ended = ("completed", "failed", "cancelled")
        st = lambda i: i.get("status") if i.get("status") in ended else None
        status, info = wait(q, float(argv[3]), st)
        ram = info.get("ram", {})
        print(f"{status} in {info.get('total-time', '?')} ms, downtime {info.get('downtime', '?')} ms, "
              f"{ram.get('transferred', 0)} bytes sent, {ram.get('dirty-sync-count', 0)} dirty syncs"
              + (f": {info['error-desc']}" if "error-desc" in info else ""))
        return 0 if status == "completed" else 1
    if argv[2] == "--wait-active":
        def active(i):
            s = i.get("status")
            if s == "active" and i.get("ram", {}).get("transferred", 0) > 0:
                return "active"
            if s in ("completed", "failed", "cancelled"):
                return s
            return None
        status, _ = wait(q, float(argv[3]), active)
        print(status)
        return 0 if status == "active" else 1
    args = json.loads(argv[3]) if len(argv) > 3 else None
    print(json.dumps(q.cmd(argv[2], args)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except (OSError, EOFError, RuntimeError, TimeoutError, ValueError) as e:
        print(f"qmp.py: {e}", file=sys.stderr)
        sys.exit(2)
