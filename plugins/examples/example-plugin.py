#!/usr/bin/env python3
"""A keywarden plugin (protocol v1) in Python, standard library only.

Its "upstream" is an SQLite file named by the EXAMPLE_STATE environment variable: a table of
credentials with a status (active, revoked, deleted) and a current flag, like a provider's API
would keep. It proves the protocol is open to any language, and the integration tests drive the
real daemon through it and then check this state from outside.

Kinds:
  example            create, verify, promote, revoke, push   (overlap: old and new coexist)
  example-exclusive  create, verify, revoke                  (overlap false: create retires the old)
  example-sts        issue, revoke                           (a short-lived credential per lease,
                                                             revocable by its lease id alone)

Settings (per secret or consumer) that make it misbehave, for tests:
  use_proposed = true                  the new value is the daemon's proposed value
  fail = {op, retryable, once}         answer that op with an error
  fail_pct = {op, pct, skip}           fail once, after `skip` successes, that op for ~pct% of secrets
  hang = {op, once}                    never answer that op
  crash = {op, once}                   exit without answering
  block = {op, once}                   do the op's effect upstream, record it, then never answer
  (any of these takes skip = N: let the first N such ops through)
  garbage = {op}                       answer with a line that is not JSON
  lie = {op}                           answer with an id that was never sent
  oversize = {op}                      answer with a line over the protocol's 1 MiB limit
  jitter_ms = N                        wait up to N ms before each op (answers out of order)
  chatty = true                        write the values it handles to stderr (redaction tests)
The environment variable EXAMPLE_DELAY_MS delays every op (for benchmarks); EXAMPLE_LINGER=1
makes it stay alive after its stdin closes (a badly behaved plugin, for the daemon's reaper);
EXAMPLE_FAULTS names a JSON file of settings added to every request's while it exists (the
faults drill injects and clears misbehaviour with it, without a restart).
"""

import json
import os
import secrets
import sqlite3
import sys
import threading
import time
import zlib
from datetime import datetime, timedelta, timezone

STATE = os.environ.get("EXAMPLE_STATE")
FAULTS = os.environ.get("EXAMPLE_FAULTS")
DELAY = int(os.environ.get("EXAMPLE_DELAY_MS", "0")) / 1000.0
OUT = threading.Lock()
KINDS = {
    "example": {"ops": ["create", "verify", "promote", "revoke", "push"], "overlap": True},
    "example-exclusive": {"ops": ["create", "verify", "revoke"], "overlap": False},
    "example-sts": {"ops": ["issue", "revoke"]},
}


class Failure(Exception):
    def __init__(self, message, retryable=False):
        super().__init__(message)
        self.retryable = retryable


def db():
    conn = sqlite3.connect(STATE, timeout=30, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def setup():
    if not STATE:
        sys.stderr.write("EXAMPLE_STATE is not set\n")
        sys.exit(2)
    conn = db()
    conn.executescript(
        """
        CREATE TABLE IF NOT EXISTS creds (
            key_id TEXT PRIMARY KEY, secret TEXT, kind TEXT, value TEXT, status TEXT,
            rotation_id TEXT, current INTEGER DEFAULT 0, issued INTEGER DEFAULT 0,
            expires_at TEXT, created_at REAL, revoked_at REAL);
        CREATE TABLE IF NOT EXISTS pushes (
            consumer TEXT, secret TEXT, version INTEGER, value TEXT, at REAL);
        CREATE TABLE IF NOT EXISTS events (op TEXT, secret TEXT, detail TEXT, at REAL);
        CREATE TABLE IF NOT EXISTS once (tag TEXT PRIMARY KEY);
        CREATE TABLE IF NOT EXISTS counts (tag TEXT PRIMARY KEY, n INTEGER);
        """
    )
    conn.close()


def event(conn, op, secret, detail=""):
    conn.execute("INSERT INTO events VALUES (?, ?, ?, ?)", (op, secret, detail, time.time()))


def first_time(conn, tag):
    """True the first time a tag is seen, across restarts."""
    try:
        conn.execute("INSERT INTO once VALUES (?)", (tag,))
        return True
    except sqlite3.IntegrityError:
        return False


def count(conn, tag):
    """How many times a tag has been seen, this time included, across restarts."""
    conn.execute("INSERT INTO counts VALUES (?, 1) ON CONFLICT (tag) DO UPDATE SET n = n + 1", (tag,))
    return conn.execute("SELECT n FROM counts WHERE tag = ?", (tag,)).fetchone()[0]


def reply(obj):
    line = json.dumps(obj, separators=(",", ":"))
    with OUT:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def misbehaviour(conn, req, when):
    """Applies the test settings for this op; `when` is 'before' or 'after' the effect."""
    op, secret, settings = req["op"], req.get("secret", ""), req.get("settings") or {}

    def selected(key):
        rule = settings.get(key)
        if not rule or rule.get("op") != op:
            return None
        if rule.get("skip") and count(conn, f"skip:{key}:{op}:{secret}:{when}") <= int(rule["skip"]):
            return None
        if rule.get("once") and not first_time(conn, f"{key}:{op}:{secret}"):
            return None
        return rule

    if when == "before":
        rule = selected("fail")
        if rule:
            event(conn, "failed:" + op, secret)
            raise Failure(f"injected failure of {op}", bool(rule.get("retryable")))
        rule = settings.get("fail_pct")
        if rule and rule.get("op") == op and zlib.crc32(secret.encode()) % 100 < int(rule["pct"]):
            # Fail once per chosen secret: the (skip+1)-th time this op runs for it.
            if count(conn, f"pct:{op}:{secret}") == int(rule.get("skip", 0)) + 1:
                event(conn, "failed:" + op, secret)
                raise Failure(f"injected failure of {op} for {secret}", False)
        if selected("hang"):
            event(conn, "hung:" + op, secret)
            time.sleep(10**6)
        if selected("crash"):
            event(conn, "crashed:" + op, secret)
            os._exit(3)
        rule = settings.get("garbage")
        if rule and rule.get("op") == op:
            with OUT:
                sys.stdout.write("this is not json\n")
                sys.stdout.flush()
            time.sleep(10**6)
        rule = settings.get("lie")
        if rule and rule.get("op") == op:
            reply({"id": req["id"] + 1000, "ok": {}})
            time.sleep(10**6)
        rule = settings.get("oversize")
        if rule and rule.get("op") == op:
            reply({"id": req["id"], "ok": {"value": "x" * (1 << 21)}})
            time.sleep(10**6)
        if settings.get("jitter_ms"):
            time.sleep(int(secrets.randbelow(int(settings["jitter_ms"]) + 1)) / 1000.0)
    elif selected("block"):
        event(conn, "blocked:" + op, secret)
        time.sleep(10**6)


def new_credential(conn, req, value, issued=False, expires_at=None):
    key_id = "EX" + secrets.token_hex(8).upper()
    conn.execute(
        "INSERT INTO creds (key_id, secret, kind, value, status, rotation_id, issued, expires_at, created_at) "
        "VALUES (?, ?, ?, ?, 'active', ?, ?, ?, ?)",
        (key_id, req.get("secret"), req.get("kind"), value, req.get("rotation_id"), int(issued), expires_at, time.time()),
    )
    return key_id


def create(conn, req):
    settings = req.get("settings") or {}
    conn.execute("BEGIN IMMEDIATE")
    # Shown-once semantics: a repeat of the same rotation deletes what the earlier try made.
    conn.execute(
        "UPDATE creds SET status = 'deleted', revoked_at = ? WHERE rotation_id = ? AND status = 'active' AND current = 0",
        (time.time(), req["rotation_id"]),
    )
    value = req.get("proposed") if settings.get("use_proposed") else "ex-" + secrets.token_urlsafe(24)
    key_id = new_credential(conn, req, value)
    if not KINDS[req["kind"]]["overlap"]:
        conn.execute(
            "UPDATE creds SET status = 'revoked', revoked_at = ? WHERE secret = ? AND key_id != ? AND status = 'active'",
            (time.time(), req.get("secret"), key_id),
        )
    event(conn, "create", req.get("secret"), key_id)
    conn.execute("COMMIT")
    return {"value": value, "meta": {"key_id": key_id}}


def lookup(conn, cred):
    key_id = (cred or {}).get("meta", {}).get("key_id")
    row = conn.execute("SELECT value, status FROM creds WHERE key_id = ?", (key_id,)).fetchone()
    return key_id, row


def verify(conn, req):
    key_id, row = lookup(conn, req.get("candidate"))
    if row is None or row[1] != "active" or row[0] != req["candidate"]["value"]:
        raise Failure(f"credential {key_id} is not valid upstream")
    event(conn, "verify", req.get("secret"), key_id)
    return {}


def promote(conn, req):
    key_id, row = lookup(conn, req.get("candidate"))
    if row is None or row[1] != "active":
        raise Failure(f"credential {key_id} cannot be promoted")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE creds SET current = 0 WHERE secret = ?", (req.get("secret"),))
    conn.execute("UPDATE creds SET current = 1 WHERE key_id = ?", (key_id,))
    event(conn, "promote", req.get("secret"), key_id)
    conn.execute("COMMIT")
    return {}


def revoke(conn, req):
    if req.get("target") is None and req.get("lease_id"):
        # The daemon journaled an issue for this lease but never learnt what was issued.
        changed = conn.execute(
            "UPDATE creds SET status = 'revoked', revoked_at = ? WHERE rotation_id = ? AND issued = 1 AND status = 'active'",
            (time.time(), req["lease_id"]),
        ).rowcount
        event(conn, "revoke-lease" if changed else "revoke-lease-again", req.get("secret"), req["lease_id"])
        return {}
    key_id, _ = lookup(conn, req.get("target"))
    changed = conn.execute(
        "UPDATE creds SET status = 'revoked', revoked_at = ?, current = 0 WHERE key_id = ? AND status = 'active'",
        (time.time(), key_id),
    ).rowcount
    # Revoking the revoked is fine (idempotent); the events tell the two apart.
    event(conn, "revoke" if changed else "revoke-again", req.get("secret"), key_id or "")
    return {}


def push(conn, req):
    settings = req.get("settings") or {}
    conn.execute(
        "INSERT INTO pushes VALUES (?, ?, ?, ?, ?)",
        (settings.get("consumer_name", "default"), req.get("secret"), req.get("version"), req.get("value"), time.time()),
    )
    event(conn, "push", req.get("secret"), str(req.get("version")))
    return {}


def issue(conn, req):
    ttl = int(req.get("ttl_seconds") or 300)
    expires = (datetime.now(timezone.utc) + timedelta(seconds=ttl)).strftime("%Y-%m-%dT%H:%M:%SZ")
    value = "exi-" + secrets.token_urlsafe(24)
    # Tagged with its lease (kept in rotation_id), so it can be revoked by lease alone.
    key_id = new_credential(conn, dict(req, rotation_id=req.get("lease_id")), value, issued=True, expires_at=expires)
    event(conn, "issue", req.get("secret"), key_id)
    return {"value": value, "meta": {"key_id": key_id}, "expires_at": expires}


OPS = {"create": create, "verify": verify, "promote": promote, "revoke": revoke, "push": push, "issue": issue}


def injected_faults():
    """The settings in the EXAMPLE_FAULTS file, if it exists now."""
    try:
        with open(FAULTS) as f:
            return json.load(f)
    except (TypeError, OSError, ValueError):
        return {}


def handle(req):
    conn = db()
    try:
        faults = injected_faults() if FAULTS else {}
        if faults:
            req = dict(req, settings=dict(req.get("settings") or {}, **faults))
        op = req.get("op")
        kind = req.get("kind")
        if op not in OPS or (kind is not None and (kind not in KINDS or op not in KINDS[kind]["ops"])):
            return {"id": req["id"], "err": {"retryable": False, "message": "unsupported op"}}
        if DELAY:
            time.sleep(DELAY)
        if (req.get("settings") or {}).get("chatty"):
            for field in ("proposed", "value"):
                if req.get(field):
                    sys.stderr.write(f"chatty: {op} got {field} {req[field]}\n")
            for field in ("current", "candidate", "target"):
                if req.get(field):
                    sys.stderr.write(f"chatty: {op} got {field} {req[field]['value']}\n")
            sys.stderr.flush()
        misbehaviour(conn, req, "before")
        result = OPS[op](conn, req)
        misbehaviour(conn, req, "after")
        return {"id": req["id"], "ok": result}
    except Failure as e:
        return {"id": req["id"], "err": {"retryable": e.retryable, "message": str(e)}}
    except Exception as e:  # a bug or a locked database: worth a retry
        return {"id": req["id"], "err": {"retryable": True, "message": f"{type(e).__name__}: {e}"}}
    finally:
        conn.close()


def worker(req):
    reply(handle(req))


def main():
    if "--keywarden-plugin=1" not in sys.argv:
        sys.stderr.write("this is a keywarden plugin; keywarden runs it\n")
        return 2
    setup()
    reply({"keywarden_plugin": 1, "name": "example", "version": "1.0.0", "kinds": KINDS})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
        except ValueError:
            sys.stderr.write("ignoring a line that is not JSON\n")
            continue
        if req.get("op") == "shutdown":
            break
        threading.Thread(target=worker, args=(req,), daemon=True).start()
    else:
        # Input closed: the daemon died.
        if os.environ.get("EXAMPLE_LINGER") == "1":
            time.sleep(10**6)
    # Leave without waiting for stuck threads.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
