#!/usr/bin/env python3
"""A PostgreSQL failover under Patroni (docs/operations.md#postgresql-high-availability),
driven by scripts/verify/patroni.sh, which builds the binary and exports WORK and BIN.

One etcd, two Patroni nodes (PostgreSQL 15, synchronous mode, so an acknowledged commit
is on both), Redis, the mock provider and two replicas whose DATABASE_URL names both
nodes with target_session_attrs=read-write. Messages are created through the API while
the replicas drain them; then the primary's machine "dies": its Patroni and its
postmaster get SIGKILL. Patroni promotes the standby once the leader key expires (TTL
20 s); the replicas find the new primary by themselves. Checked: every message the API
acknowledged (201) is sent exactly once (the mock counts requests per Idempotency-Key),
none is left pending or sending, and intake works on the new primary. Printed: the time
from the kill to the promotion and to the first send after it. Everything runs on
127.0.0.1. Standard library only."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from harness import (BIN, WORK, free_port, harness_sh, http, note, request, spawn,  # noqa: E402
                     start_mock, start_replicas, wait_until)

PG_BIN = "/usr/lib/postgresql/15/bin"
TTL = 20
RESULT = {"violations": []}


def fail(text):
    RESULT["violations"].append(text)
    note("VIOLATION: " + text)


def as_postgres(cmd):
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def node_config(name, pg_port, rest_port, etcd_port):
    data = WORK / name
    sockets = WORK / (name + "-sock")
    for d in (data, sockets):
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o700)
        if os.geteuid() == 0:
            subprocess.run(["chown", "postgres:", str(d)], check=True)
    text = f"""scope: md-trial
namespace: /md/
name: {name}
restapi:
  listen: 127.0.0.1:{rest_port}
  connect_address: 127.0.0.1:{rest_port}
etcd3:
  hosts: 127.0.0.1:{etcd_port}
bootstrap:
  dcs:
    ttl: {TTL}
    loop_wait: 2
    retry_timeout: 5
    synchronous_mode: true
    postgresql:
      use_pg_rewind: false
      parameters:
        max_connections: 100
  initdb:
    - encoding: UTF8
postgresql:
  listen: 127.0.0.1:{pg_port}
  connect_address: 127.0.0.1:{pg_port}
  data_dir: {data}
  bin_dir: {PG_BIN}
  pgpass: {sockets}/pgpass
  authentication:
    superuser:
      username: postgres
      password: trial
    replication:
      username: replicator
      password: trial
  parameters:
    unix_socket_directories: {sockets}
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 trust
    - host replication replicator 127.0.0.1/32 trust
"""
    path = WORK / (name + ".yml")
    path.write_text(text)
    os.chmod(path, 0o644)
    return path


class Node:
    def __init__(self, name, etcd_port):
        self.name = name
        self.pg_port, self.rest_port = free_port(), free_port()
        self.config = node_config(name, self.pg_port, self.rest_port, etcd_port)
        self.proc = None

    def start(self):
        self.proc = spawn(as_postgres(["patroni", str(self.config)]), "patroni-" + self.name)

    def role(self):
        """'primary', 'replica' or None (from Patroni's REST API)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError("patroni %s exited (see %s/logs/patroni-%s.log)" % (self.name, WORK, self.name))
        for role in ("primary", "replica"):
            try:
                if http("http://127.0.0.1:%d/%s" % (self.rest_port, role), timeout=2)[0] == 200:
                    return role
            except Exception:
                pass
        return None

    def is_sync_standby(self):
        self.role()
        try:
            return http("http://127.0.0.1:%d/sync" % self.rest_port, timeout=2)[0] == 200
        except Exception:
            return False

    def die(self):
        """SIGKILL to Patroni and to the postmaster: the machine is gone."""
        out = subprocess.run(["pgrep", "-f", "patroni %s" % self.config], capture_output=True, text=True)
        for pid in out.stdout.split():
            os.kill(int(pid), signal.SIGKILL)
        pidfile = WORK / self.name / "postmaster.pid"
        if pidfile.exists():
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)


def main():
    etcd_client, etcd_peer = free_port(), free_port()
    spawn(["etcd", "--name", "e1", "--data-dir", str(WORK / "etcd"),
           "--listen-client-urls", "http://127.0.0.1:%d" % etcd_client,
           "--advertise-client-urls", "http://127.0.0.1:%d" % etcd_client,
           "--listen-peer-urls", "http://127.0.0.1:%d" % etcd_peer,
           "--initial-advertise-peer-urls", "http://127.0.0.1:%d" % etcd_peer,
           "--initial-cluster", "e1=http://127.0.0.1:%d" % etcd_peer], "etcd")
    wait_until(lambda: http("http://127.0.0.1:%d/health" % etcd_client)[0] == 200, 30, 0.2, "etcd")
    nodes = [Node("pg1", etcd_client), Node("pg2", etcd_client)]
    nodes[0].start()
    wait_until(lambda: nodes[0].role() == "primary", 120, 0.5, "pg1 primary")
    nodes[1].start()
    wait_until(lambda: nodes[1].is_sync_standby(), 180, 0.5, "pg2 a synchronous standby")
    primary = nodes[0]
    note("Patroni: pg1 primary on :%d, pg2 synchronous standby on :%d" % (nodes[0].pg_port, nodes[1].pg_port))
    subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(primary.pg_port), "-U", "postgres", "-qc",
                    "CREATE DATABASE messages_db"], check=True)

    hosts = ",".join("127.0.0.1:%d" % n.pg_port for n in nodes)
    database_url = "postgres://postgres@%s/messages_db?target_session_attrs=read-write&connect_timeout=2" % hosts
    redis_port = free_port()
    harness_sh("start_redis", str(WORK / "redis"), str(redis_port))
    _, mock_url = start_mock()
    env = {"DATABASE_URL": database_url, "REDIS_URL": "redis://127.0.0.1:%d" % redis_port,
           "SMS_API_URL": mock_url + "/send", "SMS_API_TOKEN": "trial", "BATCH_SIZE": "5",
           "PROCESSING_INTERVAL": "200ms", "DISTRIBUTED_LOCK_TTL": "2s", "LOCK_RETRY_INTERVAL": "250ms",
           "AUTO_START": "true", "AUTO_MIGRATE": "true", "API_TOKEN": None}
    replicas = start_replicas(2, env)
    note("replicas ready, DATABASE_URL %s" % database_url)

    acknowledged, refused = [], [0]
    stop_creating = threading.Event()

    def create(round_no):
        body = [{"phone_number": "+9055530%05d" % (round_no * 10 + i), "content": "trial %d.%d" % (round_no, i)}
                for i in range(10)]
        replica = replicas[round_no % 2]
        try:
            status, answer = request(replica.url + "/api/messages", "POST", body, timeout=5)
        except Exception:
            refused[0] += 1
            return
        if status == 201:
            acknowledged.extend(m["id"] for m in json.loads(answer))
        else:
            refused[0] += 1

    def creator():
        n = 0
        while not stop_creating.is_set():
            create(n)
            n += 1
            time.sleep(0.5)

    worker = threading.Thread(target=creator, daemon=True)
    worker.start()
    time.sleep(8)
    killed_at = time.time()
    primary.die()
    note("pg1 (the primary) killed: Patroni and the postmaster, SIGKILL")
    wait_until(lambda: nodes[1].role() == "primary", TTL * 4, 0.2, "pg2 promoted")
    promoted_at = time.time()
    note("pg2 promoted %.1f s after the kill" % (promoted_at - killed_at))
    time.sleep(10)
    stop_creating.set()
    worker.join(timeout=30)

    def settled():
        status, body = http(replicas[0].url + "/api/messages/stats", timeout=5)
        if status != 200:
            return False
        counts = json.loads(body)["by_status"]
        return counts["pending"] == 0 and counts["sending"] == 0
    wait_until(settled, 180, 1, "the queue drained")
    stats = json.loads(http(mock_url + "/stats")[1])
    requests = json.loads(http(mock_url + "/requests")[1])
    status, body = http(replicas[0].url + "/api/messages/stats")
    by_status = json.loads(body)["by_status"]
    after = sorted(r for r in (parse_arrival(r) for r in requests) if r and r > killed_at)
    if stats["duplicates"]:
        fail("%d duplicate Idempotency-Keys at the provider" % stats["duplicates"])
    if by_status["sent"] != len(acknowledged):
        fail("%d acknowledged, %d sent (%s)" % (len(acknowledged), by_status["sent"], by_status))
    if stats["unique_keys"] != len(acknowledged):
        fail("%d acknowledged, %d unique keys at the provider" % (len(acknowledged), stats["unique_keys"]))
    print()
    print("==== Patroni failover trial")
    print("acknowledged messages      %d (create requests refused or unanswered during the failover: %d)"
          % (len(acknowledged), refused[0]))
    print("sent                       %d; provider: unique keys %d, duplicates %d"
          % (by_status["sent"], stats["unique_keys"], stats["duplicates"]))
    print("kill -> promotion          %.1f s (leader key TTL %d s)" % (promoted_at - killed_at, TTL))
    if after:
        print("kill -> first send after   %.1f s" % (after[0] - killed_at))
    for replica in replicas:
        replica.stop()
    if RESULT["violations"]:
        print("RESULT: FAIL")
        return 1
    print("RESULT: PASS")
    return 0


def parse_arrival(entry):
    """The arrival time (epoch seconds) of a mock /requests entry."""
    return entry["at_us"] / 1e6 if "at_us" in entry else None


if __name__ == "__main__":
    if not BIN:
        sys.exit("BIN is not set (run scripts/verify/patroni.sh)")
    sys.exit(main())
