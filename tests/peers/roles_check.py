"""Checks the recommended NATS roles from a plain nats-py client, as a user
of another language would: each role connects with its own user and inbox
prefix, does its job, and is refused what it may not do.

Usage: roles_check.py NATS_URL WORKLOAD. Prints one line per check and OK at
the end; any failure exits non-zero saying which check failed.
"""
import asyncio
import json
import sys

import nats
from nats.errors import NoRespondersError, TimeoutError
from nats.js.api import DeliverPolicy

URL, WORKLOAD = sys.argv[1], sys.argv[2]


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", flush=True)
        sys.exit(1)
    print(f"ok: {what}", flush=True)


async def connect(user, password, inbox):
    refusals = []

    async def on_error(e):
        refusals.append(str(e))

    nc = await nats.connect(URL, user=user, password=password,
                            inbox_prefix=inbox.encode(), error_cb=on_error,
                            allow_reconnect=False)
    return nc, refusals


async def task(nc, subject, body, timeout=5):
    reply = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
    return json.loads(reply.data)


async def fanout(nc, subject, body, timeout=5):
    """Publishes a fan-out and reads replies until every node's done."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, json.dumps(body).encode(), reply=inbox)
    results, done = [], None
    while done is None:
        m = await sub.next_msg(timeout=timeout)
        d = json.loads(m.data)
        if d.get("done"):
            done = d
        else:
            results.append(d)
    await sub.unsubscribe()
    return results, done


async def refused(refusals, what):
    for _ in range(50):
        if any("permissions violation" in r.lower() for r in refusals):
            return True
        await asyncio.sleep(0.1)
    return False


async def main():
    w = WORKLOAD
    # The read-only operator: reads, and nothing else.
    nc, refusals = await connect("reader", "rpw", "_INBOX.reader")
    r = await task(nc, f"otto.task.read.{w}", {"command": "echo", "args": [7]})
    check(r["success"] and r["return"]["args"] == [7], "reader runs echo on the read subject")
    r = await task(nc, f"otto.task.read.{w}", {"command": "set", "kwargs": {"ping_ms": 5}})
    check(not r["success"] and r["errorCode"] == "forbidden",
          f"a write smuggled onto the read subject is answered forbidden ({r['error']})")
    results, done = await fanout(nc, "otto.fanout.read", {"select": w, "command": "hello"})
    check(done["results"] == 1 and results[0]["success"], "reader fans out a read")
    results, done = await fanout(nc, "otto.fanout.read", {"select": w, "command": "set",
                                                          "kwargs": {"ping_ms": 5}})
    check(results and all(x["errorCode"] == "forbidden" for x in results),
          "a write fan-out on the read subject is answered forbidden")
    try:
        await task(nc, f"otto.task.write.{w}", {"command": "set", "kwargs": {"ping_ms": 5}},
                   timeout=2)
        check(False, "reader's write must not be answered")
    except (TimeoutError, NoRespondersError):
        pass
    check(await refused(refusals, "write"), f"NATS refuses the reader's write subject {refusals}")
    await nc.close()

    # The operator: reads and writes.
    nc, _ = await connect("op", "opw", "_INBOX.operator")
    r = await task(nc, f"otto.task.write.{w}", {"command": "set", "kwargs": {"ping_ms": 5}})
    check(r["success"], f"operator runs a write ({r.get('error')})")
    r = await task(nc, f"otto.task.read.{w}", {"command": "hello"})
    check(r["success"], "operator runs a read")
    await nc.close()

    # The schedule manager: writes schedules, reads results; no specs.
    nc, _ = await connect("sched", "spw", "_INBOX.scheduler")
    js = nc.jetstream()
    schedules = await js.key_value("otto_schedules")
    await schedules.put("py-check", json.dumps(
        {"select": w, "command": "hello", "every": "1h", "enabled": False}).encode())
    check(json.loads((await schedules.get("py-check")).value)["command"] == "hello",
          "schedule manager writes a schedule")
    await schedules.delete("py-check")
    specs = await js.key_value("otto_workloads")
    try:
        await specs.put("py-spec", b'{"kind": "sim"}')
        check(False, "schedule manager must not write specs")
    except Exception as e:  # the server refuses the publish: no ack
        check(True, f"schedule manager cannot write specs ({type(e).__name__})")
    sub = await js.subscribe(f"otto.results.{w}.>", stream="otto_results",
                             deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, ordered_consumer=True)
    m = await sub.next_msg(timeout=5)
    check(json.loads(m.data)["workload"] == w, "schedule manager reads the result history")
    await nc.close()

    # The watcher: state, never anyone's replies.
    nc, refusals = await connect("watcher", "wpw", "_INBOX.watcher")
    kv = await nc.jetstream().key_value("otto_state")
    entry = await kv.get(w)
    check(json.loads(entry.value)["status"] == "running", "watcher reads the state bucket")
    await nc.subscribe("_INBOX.>")
    check(await refused(refusals, "inboxes"), "NATS refuses the watcher's _INBOX.> subscription")
    try:
        await task(nc, f"otto.task.read.{w}", {"command": "hello"}, timeout=2)
        check(False, "watcher's task must not be answered")
    except (TimeoutError, NoRespondersError):
        pass
    await nc.close()
    print("OK", flush=True)


asyncio.run(main())
