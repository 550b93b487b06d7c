"""Names of sources in a shard folder: salted source ids, the key (salt) that makes them, and the
optional id -> path map.

Folder and file names (often patient data) never reach the shard folder: each source file is named
by a salted hash. The salt is the folder's key and is kept OUTSIDE the folder, by default in a file
beside it (DIR.key for DIR, mode 0600) or where --key says: whoever receives the folder cannot hash a
guessed path and test whether a patient is in it. The marker holds only `key_check`, a salted hash of
the key that tells a wrong key file from the right one. Reading pixels (training, --review) needs no
key; recognising files by path (a second prepare, labels by path) does. --path-map writes the table
outside the folder."""

import hashlib
import json
import os

from urfm_fast.data.shards import INDEX, SKIPPED, read_jsonl, read_marker, write_jsonl, write_marker
from urfm_fast.data.sources import PrepareError

KEY_SUFFIX = ".key"
KEY_FORMAT = "urfm-shards-key"


class SourceKeyError(PrepareError, ValueError):
    """The folder's key is missing, unreadable or belongs to another folder (one line)."""


def default_key_path(out):
    """Where a folder's key lives unless --key says otherwise: beside it, DIR.key."""
    return os.path.normpath(os.fspath(out)) + KEY_SUFFIX


def check_key_path(key, out):
    """Refuse a --key inside the shard folder (the folder is what gets shared) or a folder."""
    kp, root = os.path.realpath(key), os.path.realpath(out)
    if os.path.commonpath([kp, root]) == root:
        raise SourceKeyError(f"--key {key} is inside the shard folder; the key must be kept apart from the "
                             "folder that is shared (choose a path outside --out)")
    if os.path.isdir(kp):
        raise SourceKeyError(f"--key {key} is a folder; give a file")


def _key_check(salt):
    return _hash(salt, "check", KEY_FORMAT)[:16]


def _read_key(path):
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        salt = d["salt"] if d.get("format") == KEY_FORMAT else None
    except (OSError, ValueError, UnicodeDecodeError, KeyError, AttributeError, TypeError):
        salt = None
    if not isinstance(salt, str) or not salt:
        raise SourceKeyError(f"key file {path} is not a shard folder key of prepare")
    return salt


def _write_key(path, salt):
    """Create the key file, readable by its owner only; -> the salt it holds (another part's, when a
    concurrent run created it first)."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"format": KEY_FORMAT, "version": 1, "salt": salt}, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # appears whole or not at all; never replaces a key
    except FileExistsError:
        return _read_key(path)
    finally:
        os.remove(tmp)
    return salt


def _holds_ids(out):
    """True when the folder's index or skip list names sources by salted id (a key made them)."""
    return any("id" in r for name in (INDEX, SKIPPED) for r in read_jsonl(os.path.join(out, name))[:1])


def folder_salt(out, key=None, create=False, say=print):
    """The folder's key (hex salt) for hashing source names, read from `key` (default DIR.key).

    create (prepare): a new folder gets a new key file (mode 0600); a folder written before keys lived
    outside it (salt in the marker) has it moved to the key file, ids unchanged, said once via `say`.
    Raises SourceKeyError (one line naming the key file looked for) when the key is missing for a folder
    whose sources are already named by it, or when the key file belongs to another folder."""
    kp = os.fspath(key) if key else default_key_path(out)
    check_key_path(kp, out)
    meta = read_marker(out)
    if "salt" in meta:  # written before the key moved out of the folder
        salt = meta["salt"]
        if not create:
            return salt
        if os.path.exists(kp) and _read_key(kp) != salt:
            raise SourceKeyError(f"key file {kp} exists and does not belong to {out}; move it away or pass "
                                 "--key FILE")
        _write_key(kp, salt)
        meta = {k: v for k, v in meta.items() if k != "salt"}
        write_marker(out, {**meta, "key_check": _key_check(salt)})
        say(f"moved the key naming the sources of {out} out of the folder into {kp} (ids unchanged): share the "
            "folder, keep the key")
        return salt
    if os.path.exists(kp):
        salt = _read_key(kp)
        if meta.get("key_check", _key_check(salt)) != _key_check(salt):
            raise SourceKeyError(f"key file {kp} does not belong to {out} (its check differs); pass --key FILE "
                                 "with this folder's key")
    elif "key_check" in meta or _holds_ids(out):
        raise SourceKeyError(f"the key naming the sources of {out} is not at {kp}: without it no file can be "
                             "recognised (pass --key FILE where the key is kept)")
    elif not create:
        raise SourceKeyError(f"{out} has no key at {kp} and names no sources yet")
    else:
        salt = _write_key(kp, os.urandom(16).hex())
    if create and "key_check" not in meta:
        write_marker(out, {**meta, "key_check": _key_check(salt)})
    return salt


def _hash(salt, kind, text):
    return hashlib.sha256(f"{salt}\0{kind}\0{text}".encode()).hexdigest()


def source_id(salt, src, rel):
    """Stable salted hash naming one source file in every output: 8 hex digits for the source folder
    name, 16 for the path inside it (so a labels file can name a file with or without its folder)."""
    return _hash(salt, "src", src)[:8] + _hash(salt, "path", rel)[:16]


def record_source(r):
    """The source (folder) of an index record, hashed or, in older folders, by name."""
    return r["src"] if "src" in r else r["id"][:8]


def path_lookup(root, records, key=None):
    """-> find(path) -> indices of the records of that source file, where path is "rel/path" or
    "src/rel/path" (for labels files that name files by path; the names are hashed the same way with
    the folder's key: `key` or DIR.key, SourceKeyError without it)."""
    if records and "path" in records[0]:  # written before sources were hashed
        by_key = {}
        for k, r in enumerate(records):
            for key in {r["path"], f"{r['src']}/{r['path']}" if r["src"] else r["path"]}:
                by_key.setdefault(key, []).append(k)
        return lambda p: by_key.get(p, [])
    salt = folder_salt(root, key)
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


def hash_old_names(out, salt):
    """Folders written before sources were hashed name them in index.jsonl and skipped.jsonl: replace
    those names by their ids (each file rewritten whole, atomically) -> [(id, src, rel)] replaced."""
    named = []
    for name in (INDEX, SKIPPED):
        p = os.path.join(out, name)
        rows = read_jsonl(p)
        if not any("path" in r for r in rows):
            continue
        for k, r in enumerate(rows):
            if "path" in r:
                src, rel = r.pop("src"), r.pop("path")
                sid = source_id(salt, src, rel)
                named.append((sid, src, rel))
                rows[k] = {"id": sid, **r}
        write_jsonl(p, rows)
    return named


def check_path_map(path_map, out):
    """Refuse a --path-map inside the shard folder, or an existing file that is not a path map."""
    pm, root = os.path.realpath(path_map), os.path.realpath(out)
    if os.path.commonpath([pm, root]) == root:
        raise PrepareError(f"--path-map {path_map} is inside the shard folder; the map names patients' "
                           "files and must be kept apart from the shards (choose a path outside --out)")
    if os.path.isdir(pm) or not os.path.isdir(os.path.dirname(pm)):
        raise PrepareError(f"--path-map {path_map} is a folder or in a folder that does not exist")
    try:
        rows = read_jsonl(pm)
    except (OSError, ValueError, UnicodeDecodeError):
        rows = None
    if rows is None or any(set(r) != {"id", "src", "path"} for r in rows):
        raise PrepareError(f"--path-map {path_map} exists and is not a path map of prepare; choose another file")
    return {r["id"]: r for r in rows}


def write_path_map(path_map, known, entries):
    """Merge (id, src, rel) entries into the user's path map (JSON lines: id, src, path)."""
    for sid, src, rel in entries:
        known.setdefault(sid, {"id": sid, "src": src, "path": rel})
    write_jsonl(path_map, sorted(known.values(), key=lambda r: (r["src"], r["path"])))
