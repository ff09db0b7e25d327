"""PostgreSQL's cost per dispatched message, in instructions: deterministic, so two
schemas compare exactly on a busy or drifting machine, where CPU seconds do not.

The leader's claim (CLAIM) and group result write (MARK_SENT_GROUP) are read from the
Rust source (src/store/) and replayed as prepared statements by one `postgres
--single` backend under valgrind's callgrind, on a table of SEED rows seeded and
migrated by the binary: N messages, claimed BATCH at a time and marked sent GROUP at
a time. The count includes each statement's triggers, constraints, index inserts and
WAL, and the formatting of the rows the statements return (single-user mode prints
them, where a server sends them). A run with no messages is subtracted (start-up and
shutdown).

Variants, each on a fresh cluster in the same run:
  schema         as migrated
  before-0008    the listing index (status, id DESC) with `sending` rows again, as
                 before migration 0008
  before-0009    the format rules as table CHECK constraints again, as before
                 migration 0009 (PostgreSQL evaluates them on every UPDATE;
                 scripts/bench/sql/before-0009.sql)
and, with EACH_INDEX=1, the schema without each index in turn (what each costs).

    ./scripts/bench/run.sh pg-cost          # about 2 minutes
    N=2000 ./scripts/bench/run.sh pg-cost   # quicker

With KEYED=1 every seeded message carries an idempotency key ("order-<id>"), as
messages posted with one do.

Settings (environment): N (10000), SEED (100000), BATCH (500), GROUP (250), EACH_INDEX
(0), KEYED (0), PROFILE (release or debug: the binary only migrates and seeds), BIN.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from harness import BIN, ROOT, WORK, child_env, env, env_int, free_port, harness_sh, note, track  # noqa: E402
from measure import constant, write_result  # noqa: E402

OLD_INDEX = ("DROP INDEX messages_status_id_idx; "
             "CREATE INDEX messages_status_id_idx ON messages (status, id DESC)")


# --------------------------------------------------------------------------- replay


def array(items) -> str:
    return "'{" + ",".join(items) + "}'"


def replay(source: str, messages: int, batch: int, group: int) -> str:
    """The statements for `postgres --single` (one command per line)."""
    out = [f"PREPARE claim(int, bigint, text, bigint) AS {constant(source, 'CLAIM')};",
           "PREPARE mark(bigint[], bigint[], timestamptz[], text[]) AS "
           f"{constant(source, 'MARK_SENT_GROUP')};"]
    # Seeded ids run from 1 in FIFO order, so the claims take them in order.
    next_id = 1
    for token in range(messages // batch):
        out.append(f"BEGIN; EXECUTE claim({batch}, 1, 'bench', {token}); COMMIT;")
        for _ in range(batch // group):
            ids = range(next_id, next_id + group)
            next_id += group
            out.append("EXECUTE mark(" + ", ".join([
                array(map(str, ids)),
                array(["1"] * group),
                array(['"2026-12-01 10:00:00+00"'] * group),
                array(["%08x-4b1d-4c5e-9a7f-%012x" % (i, i) for i in ids]),
            ]) + ");")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- runs


def as_pg(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.getuid() == 0 else cmd


def sh(function: str, *args: str) -> None:
    out = harness_sh(function, *args, timeout=300)
    if out.returncode != 0:
        sys.exit(f"pg_cost.py: {function} {' '.join(args)} failed: {out.stderr.strip()}")


def prepare(name: str, sql: str, seed: int, keyed: bool) -> Path:
    """A stopped cluster WORK/NAME, migrated, `sql` applied, `seed` rows."""
    directory = WORK / name
    port = free_port()
    sh("start_postgres", str(directory), str(port))
    url = f"postgres://postgres@127.0.0.1:{port}/messages_db"
    quiet = {"stdout": subprocess.DEVNULL, "check": True}
    subprocess.run([BIN, "migrate"], env={**os.environ, "DATABASE_URL": url}, **quiet)
    psql = ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "messages_db", "-qX",
            "-v", "ON_ERROR_STOP=1"]
    if sql:
        subprocess.run([*psql, "-c", sql], **quiet)
    subprocess.run([BIN, "seed", "--count", str(seed)], env={**os.environ, "DATABASE_URL": url}, **quiet)
    if keyed:
        subprocess.run([*psql, "-c", "UPDATE messages SET idempotency_key = 'order-' || id"], **quiet)
    subprocess.run([*psql, "-c", "UPDATE dispatcher_leader SET epoch = 1, holder = 'bench', acquired_at = now()",
                    "-c", "VACUUM ANALYZE", "-c", "CHECKPOINT"], **quiet)
    sh("stop_postgres", str(directory))
    return directory


def instructions(directory: Path, source: str, messages: int, batch: int, group: int) -> int:
    """callgrind's instruction count for the replay of `messages` messages."""
    out = WORK / f"{directory.name}.{messages}"
    Path(f"{out}.sql").write_text(replay(source, messages, batch, group))
    os.chmod(f"{out}.sql", 0o644)
    os.chmod(WORK, 0o777)  # callgrind, as postgres, writes its output here
    pg_bin = env("PG_BIN")
    with open(f"{out}.sql") as stdin, open(f"{out}.log", "w") as log:
        proc = subprocess.Popen(
            as_pg(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.cg",
                   f"{pg_bin}/postgres", "--single", "-D", str(directory / "data"), "-c", "fsync=off",
                   "-c", "autovacuum=off", "messages_db"]),
            stdin=stdin, stdout=log, stderr=subprocess.STDOUT, env=child_env())
        track(proc.pid)
        code = proc.wait()
    text = Path(f"{out}.log").read_text(errors="replace")
    if code != 0:
        print("\n".join(text.splitlines()[-20:]), file=sys.stderr)
        sys.exit(f"pg_cost.py: the replay failed ({directory.name})")
    if "ERROR" in text:
        print("\n".join([line for line in text.splitlines() if "ERROR" in line][:3]), file=sys.stderr)
        sys.exit(f"pg_cost.py: a statement failed ({directory.name})")
    annotated = subprocess.run(["callgrind_annotate", f"{out}.cg"], capture_output=True, text=True).stdout
    match = re.search(r"^\s*([\d,]+)\s.*PROGRAM TOTALS", annotated, re.M)
    if not match:
        sys.exit(f"pg_cost.py: no PROGRAM TOTALS in callgrind_annotate's output ({directory.name})")
    return int(match.group(1).replace(",", ""))


def main() -> int:
    n, seed = env_int("N", 10_000), env_int("SEED", 100_000)
    batch, group = env_int("BATCH", 500), env_int("GROUP", 250)
    keyed = env("KEYED", "0") == "1"
    # The statements as the service runs them, wherever in src/store/ they live.
    source = "\n".join(p.read_text() for p in sorted((ROOT / "src" / "store").rglob("*.rs")))
    variants = [("schema", ""), ("before-0008", OLD_INDEX),
                ("before-0009", (Path(__file__).resolve().parent / "sql" / "before-0009.sql").read_text())]
    if env("EACH_INDEX", "0") == "1":
        for index in ("messages_status_id_idx", "messages_sending_claimed_idx", "messages_provider_message_id_idx"):
            variants.append((f"without {index}", f"DROP INDEX {index}"))
        variants.append(("without the count triggers", "DROP TRIGGER messages_count_updates ON messages"))

    result = {}
    for name, sql in variants:
        note(name)
        directory = prepare(name.replace(" ", "_"), sql, seed, keyed)
        # The replay without messages only prepares the statements: it changes nothing.
        empty = instructions(directory, source, 0, batch, group)
        full = instructions(directory, source, n, batch, group)
        result[name] = (full - empty) // n

    base = result["schema"]
    print()
    print(f"PostgreSQL instructions per dispatched message (N={n} of SEED={seed} rows, BATCH={batch}, "
          f"GROUP={group}, KEYED={int(keyed)})")
    print("| %-45s | %12s | %10s |" % ("variant", "instr/msg", "vs schema"))
    print("|%s|%s|%s|" % ("-" * 47, "-" * 14, "-" * 12))
    rows = []
    for name, _ in variants:
        ratio = f"{result[name] / base:.3f}"
        print("| %-45s | %12s | %10s |" % (name, result[name], ratio))
        rows.append({"figure": f"PostgreSQL instructions per message: {name}", "n": n,
                     "value": f"{result[name]} ({ratio} x schema)", "target": "-", "result": "-"})
    postgres = subprocess.run([f"{env('PG_BIN')}/postgres", "--version"], capture_output=True, text=True).stdout
    valgrind = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"postgres {postgres.split()[2]}, {valgrind}")
    write_result("pg-cost", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
