"""The replay for bench-pg-cost.sh: the leader's claim and group result write, read
from src/store/queue.rs, as prepared statements for `postgres --single` (one command
per line).

    bench_pg_cost.py QUEUE_RS MESSAGES BATCH GROUP
"""
import re
import sys


STRING = r'"((?:[^"\\]|\\.)*)"'


def literal(text: str) -> str:
    """A Rust string literal's content: line continuations and escapes undone."""
    text = re.sub(r"\\\n\s*", "", text)
    return text.replace('\\"', '"').replace("\\\\", "\\")


def macro(source: str, name: str) -> str:
    """The text of `name!()`: the first arm of `macro_rules! name`."""
    match = re.search(r"macro_rules! " + name + r" \{\s*\(\) => \{\s*" + STRING, source, re.S)
    if not match:
        sys.exit(f"macro {name} not found in the source")
    return literal(match.group(1))


def constant(source: str, name: str) -> str:
    """The text of `const NAME: &str = "...";` or `= concat!("...", macro!(), ...);`
    (or `pub const`), on one line."""
    match = re.search(r"const " + name + r": &str = (concat!\((.*?)\);|" + STRING + ";)", source, re.S)
    if not match:
        sys.exit(f"{name} not found in the source")
    if match.group(2) is None:
        text = literal(match.group(3))
    else:
        parts = re.findall(STRING + r"|(\w+)!\(\)", match.group(2))
        text = "".join(literal(s) if not m else macro(source, m) for s, m in parts)
    return " ".join(text.split())


def array(items) -> str:
    return "'{" + ",".join(items) + "}'"


def main() -> None:
    path, messages, batch, group = sys.argv[1], *map(int, sys.argv[2:5])
    source = open(path).read()
    print(f"PREPARE claim(int, bigint, text, bigint) AS {constant(source, 'CLAIM')};")
    print("PREPARE mark(bigint[], bigint[], timestamptz[], text[]) AS "
          f"{constant(source, 'MARK_SENT_GROUP')};")
    # Seeded ids run from 1 in FIFO order, so the claims take them in order.
    next_id = 1
    for token in range(messages // batch):
        print(f"BEGIN; EXECUTE claim({batch}, 1, 'bench', {token}); COMMIT;")
        for _ in range(batch // group):
            ids = range(next_id, next_id + group)
            next_id += group
            print("EXECUTE mark(" + ", ".join([
                array(map(str, ids)),
                array(["1"] * group),
                array(['"2026-12-01 10:00:00+00"'] * group),
                array(["%08x-4b1d-4c5e-9a7f-%012x" % (i, i) for i in ids]),
            ]) + ");")


if __name__ == "__main__":
    main()
