#!/usr/bin/env python3
"""Cut a provider's published OpenAPI description down to the operations we call.

    scripts/verify/trim-openapi.py SOURCE OUT 'POST /2010-04-01/Accounts/{AccountSid}/Messages.json' ...
    scripts/verify/trim-openapi.py SOURCE OUT 'POST /{format}=/sms/{format}' --server https://rest.nexmo.com

SOURCE and OUT are .json, .yaml or .yml (OUT's suffix picks the format). Each
operation is 'METHOD PATH', or 'METHOD PATH=NEWPATH' to keep it under another path
(used when a server URL carries a base path that prism would not see).

Kept: openapi, info, top-level servers/security/x-* (not x-webhooks), the named
operations with their path-level fields, the tags they use, and every component they
reach through $ref or a discriminator mapping, transitively (so the result needs no
other file). Dropped: every other path and method, `callbacks` (prism mock would call
them), top-level `webhooks`/`x-webhooks`, and components nothing kept refers to.
--server URL replaces the top-level servers. --move FROM TO (repeatable) moves a value
from one JSON pointer of the trimmed document to another, as a JSON Patch "move" does
(e.g. to turn a response's oneOf into anyOf). Fails if any $ref is left dangling or
points outside the document.
"""
import argparse
import copy
import json
import sys

import yaml

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def load(path):
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            return json.load(f)
        return yaml.safe_load(f)


def dump(doc, path):
    with open(path, "w", encoding="utf-8") as f:
        if path.endswith(".json"):
            json.dump(doc, f, indent=2, ensure_ascii=False)
            f.write("\n")
        else:
            yaml.safe_dump(doc, f, sort_keys=False, allow_unicode=True, width=100)


def refs_in(node):
    """Every local reference string in node: $ref values and discriminator mappings."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                out.append(v)
            elif k == "discriminator" and isinstance(v, dict):
                out.extend(m for m in (v.get("mapping") or {}).values() if isinstance(m, str))
                out.extend(refs_in(v))
            else:
                out.extend(refs_in(v))
    elif isinstance(node, list):
        for v in node:
            out.extend(refs_in(v))
    return out


def security_names(node):
    names = set()
    for req in node or []:
        names.update(req.keys())
    return names


def pointer_get(doc, ref):
    if not ref.startswith("#/"):
        raise SystemExit(f"external $ref not supported: {ref}")
    cur = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(cur, dict) or part not in cur:
            raise SystemExit(f"dangling $ref: {ref}")
        cur = cur[part]
    return cur


def split_pointer(ptr):
    if not ptr.startswith("/"):
        raise SystemExit(f"not a JSON pointer: {ptr}")
    return [p.replace("~1", "/").replace("~0", "~") for p in ptr[1:].split("/")]


def move(doc, frm, to):
    *fparent, fkey = split_pointer(frm)
    *tparent, tkey = split_pointer(to)
    src = doc
    for part in fparent:
        src = src[part]
    if fkey not in src:
        raise SystemExit(f"--move: nothing at {frm}")
    value = src.pop(fkey)
    dst = doc
    for part in tparent:
        dst = dst[part]
    dst[tkey] = value


def strip_callbacks(node):
    if isinstance(node, dict):
        node.pop("callbacks", None)
        for v in node.values():
            strip_callbacks(v)
    elif isinstance(node, list):
        for v in node:
            strip_callbacks(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("out")
    ap.add_argument("operations", nargs="+", help="'METHOD PATH' or 'METHOD PATH=NEWPATH'")
    ap.add_argument("--server", help="replace top-level servers with this one URL")
    ap.add_argument("--move", nargs=2, action="append", default=[], metavar=("FROM", "TO"),
                    help="JSON Patch move inside the trimmed document (JSON pointers)")
    args = ap.parse_args()

    src = load(args.source)
    out = {"openapi": src["openapi"], "info": copy.deepcopy(src["info"])}
    if args.server:
        out["servers"] = [{"url": args.server}]
    elif "servers" in src:
        out["servers"] = copy.deepcopy(src["servers"])
    if "security" in src:
        out["security"] = copy.deepcopy(src["security"])

    paths = {}
    used_security = security_names(src.get("security"))
    for spec in args.operations:
        method, _, rest = spec.partition(" ")
        method = method.lower()
        old, _, new = rest.partition("=")
        new = new or old
        item = src["paths"].get(old)
        if item is None or method not in item:
            raise SystemExit(f"no such operation in {args.source}: {method.upper()} {old}")
        dst = paths.setdefault(new, {k: copy.deepcopy(v) for k, v in item.items() if k not in METHODS})
        dst[method] = copy.deepcopy(item[method])
        used_security |= security_names(item[method].get("security"))
    strip_callbacks(paths)
    out["paths"] = paths

    # Components reached from what is kept, transitively.
    comps = {}
    todo = refs_in(paths)
    seen = set()
    while todo:
        ref = todo.pop()
        if ref in seen:
            continue
        seen.add(ref)
        target = pointer_get(src, ref)
        parts = ref[2:].split("/")
        if parts[0] != "components" or len(parts) < 3:
            continue  # a pointer into paths etc.; checked below against the output
        section, name = parts[1], parts[2].replace("~1", "/").replace("~0", "~")
        comps.setdefault(section, {})[name] = copy.deepcopy(src["components"][section][name])
        todo.extend(refs_in(target))
    schemes = (src.get("components") or {}).get("securitySchemes") or {}
    for name in sorted(used_security):
        if name not in schemes:
            raise SystemExit(f"security scheme not defined: {name}")
        comps.setdefault("securitySchemes", {})[name] = copy.deepcopy(schemes[name])
    if comps:
        # in the source document's order, so a re-run gives the same file
        out["components"] = {
            section: {n: comps[section][n] for n in src["components"][section] if n in comps[section]}
            for section in src["components"] if section in comps
        }

    used_tags = {t for item in paths.values() for m, op in item.items() if m in METHODS for t in op.get("tags", [])}
    if src.get("tags"):
        tags = [copy.deepcopy(t) for t in src["tags"] if t.get("name") in used_tags]
        if tags:
            out["tags"] = tags
    for k, v in src.items():
        if k.startswith("x-") and k not in ("x-webhooks", "x-tagGroups"):
            out[k] = copy.deepcopy(v)

    for frm, to in args.move:
        move(out, frm, to)
    for ref in refs_in(out):
        pointer_get(out, ref)  # every reference resolves inside the trimmed document
    dump(out, args.out)
    print(f"{args.out}: {len(paths)} path(s), "
          + ", ".join(f"{len(v)} {k}" for k, v in comps.items()), file=sys.stderr)


if __name__ == "__main__":
    main()
