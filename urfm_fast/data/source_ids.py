"""Names of sources in a shard folder: salted source ids and the optional id -> path map.

Folder and file names (often patient data) never reach the shard folder: each source file is named
by a salted hash (the salt is kept in the marker); --path-map writes the table outside the folder."""

import hashlib
import json
import os

from urfm_fast.data.shards import INDEX, MARKER, SKIPPED, _read_jsonl, _write_jsonl
from urfm_fast.data.sources import PrepareError


def source_salt(out):
    """The shard folder's salt (hex) for hashing source names, made on first use and kept in its marker."""
    mpath = os.path.join(out, MARKER)
    with open(mpath) as f:
        meta = json.load(f)
    if "salt" not in meta:
        meta["salt"] = os.urandom(16).hex()
        with open(mpath + ".tmp", "w") as f:
            json.dump(meta, f)
            f.write("\n")
        os.replace(mpath + ".tmp", mpath)
    return meta["salt"]


def _hash(salt, kind, text):
    return hashlib.sha256(f"{salt}\0{kind}\0{text}".encode()).hexdigest()


def source_id(salt, src, rel):
    """Stable salted hash naming one source file in every output: 8 hex digits for the source folder
    name, 16 for the path inside it (so a labels file can name a file with or without its folder)."""
    return _hash(salt, "src", src)[:8] + _hash(salt, "path", rel)[:16]


def record_source(r):
    """The source (folder) of an index record, hashed or, in older folders, by name."""
    return r["src"] if "src" in r else r["id"][:8]


def path_lookup(root, records):
    """-> find(path) -> indices of the records of that source file, where path is "rel/path" or
    "src/rel/path" (for labels files that name files by path; the names are hashed the same way)."""
    if records and "path" in records[0]:  # written before sources were hashed
        by_key = {}
        for k, r in enumerate(records):
            for key in {r["path"], f"{r['src']}/{r['path']}" if r["src"] else r["path"]}:
                by_key.setdefault(key, []).append(k)
        return lambda p: by_key.get(p, [])
    with open(os.path.join(root, MARKER)) as f:
        salt = json.load(f).get("salt", "")
    by_id, by_rel = {}, {}
    for k, r in enumerate(records):
        by_id.setdefault(r["id"], []).append(k)
        by_rel.setdefault(r["id"][8:], []).append(k)

    def find(p):
        items = set(by_rel.get(_hash(salt, "path", p)[:16], []))
        if "/" in p:
            items.update(by_id.get(source_id(salt, *p.split("/", 1)), []))
        return sorted(items)

    return find


def _hash_old_names(out, salt):
    """Folders written before sources were hashed name them in index.jsonl and skipped.jsonl: replace
    those names by their ids (each file rewritten whole, atomically) -> [(id, src, rel)] replaced."""
    named = []
    for name in (INDEX, SKIPPED):
        p = os.path.join(out, name)
        rows = _read_jsonl(p)
        if not any("path" in r for r in rows):
            continue
        for k, r in enumerate(rows):
            if "path" in r:
                src, rel = r.pop("src"), r.pop("path")
                sid = source_id(salt, src, rel)
                named.append((sid, src, rel))
                rows[k] = {"id": sid, **r}
        _write_jsonl(p, rows)
    return named


def _check_path_map(path_map, out):
    """Refuse a --path-map inside the shard folder, or an existing file that is not a path map."""
    pm, root = os.path.realpath(path_map), os.path.realpath(out)
    if os.path.commonpath([pm, root]) == root:
        raise PrepareError(f"--path-map {path_map} is inside the shard folder; the map names patients' "
                           "files and must be kept apart from the shards (choose a path outside --out)")
    if os.path.isdir(pm) or not os.path.isdir(os.path.dirname(pm)):
        raise PrepareError(f"--path-map {path_map} is a folder or in a folder that does not exist")
    try:
        rows = _read_jsonl(pm)
    except (OSError, ValueError, UnicodeDecodeError):
        rows = None
    if rows is None or any(set(r) != {"id", "src", "path"} for r in rows):
        raise PrepareError(f"--path-map {path_map} exists and is not a path map of prepare; choose another file")
    return {r["id"]: r for r in rows}


def _write_path_map(path_map, known, entries):
    """Merge (id, src, rel) entries into the user's path map (JSON lines: id, src, path)."""
    for sid, src, rel in entries:
        known.setdefault(sid, {"id": sid, "src": src, "path": rel})
    _write_jsonl(path_map, sorted(known.values(), key=lambda r: (r["src"], r["path"])))
