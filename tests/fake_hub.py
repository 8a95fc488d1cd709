"""
A tiny stand-in for the Hugging Face Hub, so download.py's real code path (huggingface_hub's
HEAD + ranged GET) can be tested offline, in milliseconds, with faults on demand.

    hub = FakeHub({("model", "org/name", "<40 hex>"): {"config.json": b"{}", ...}}).start()
    env["HF_ENDPOINT"] = hub.url       # huggingface_hub reads it at import time
    ...
    hub.count("GET", "config.json")    # how many times a file's bytes were requested
    hub.stop()

Endpoints (what huggingface_hub 2.4.0's hf_hub_download / get_hf_file_metadata / http_get
and snapshot_download call):
  HEAD|GET /{repo_id}/resolve/{revision}/{path}            models
  HEAD|GET /datasets/{repo_id}/resolve/{revision}/{path}   datasets
      headers X-Repo-Commit, ETag (quoted sha256 for LFS-like files, git blob sha1 otherwise),
      Content-Length, Accept-Ranges; GET honours "Range: bytes=a-" / "bytes=a-b" with 206.
  GET /api/{models|datasets}/{repo_id}/revision/{revision}                   repo info (siblings)
  GET /api/{models|datasets}/{repo_id}/tree/{revision}[/{path}]?recursive=.. tree listing
Errors mirror the real hub: unknown repo -> 401 X-Error-Code: RepoNotFound; unknown revision
-> 404 RevisionNotFound; unknown file -> 404 EntryNotFound (with X-Repo-Commit).

Fault knobs (keyed by the file path inside the repo):
  hub.corrupt.add(path)    serve the bytes with one byte flipped (same size, same ETag as the good file)
  hub.drop_once.add(path)  the next full GET sends half the bytes, then closes the connection
  hub.log                  list of (method, repo_id, path, range header or None), in order
                           (/api/... calls are logged with repo_id None and the full URL path)
The tree listing is always recursive and lists files only (enough for snapshot_download).
"""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# The real hub stores these through git LFS: their ETag is the sha256 of the content
LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".gz", ".jsonl", ".parquet")


def etag_of(path, data):
    if path.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob id, as the hub sends for small files


class FakeHub:
    def __init__(self, repos):
        # {(repo_type, repo_id, revision): {path: bytes}}
        self.repos = repos
        self.corrupt = set()
        self.drop_once = set()
        self.log = []
        self._lock = threading.Lock()
        self.server = None

    # -- helpers for tests -----------------------------------------------------
    @property
    def url(self):
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def count(self, method, path):
        with self._lock:
            return sum(1 for m, _, p, _ in self.log if m == method and p == path)

    def requested_paths(self):
        with self._lock:
            return {p for _, _, p, _ in self.log}

    def start(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like the real hub (httpx pools connections)

            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    # -- request handling ------------------------------------------------------
    def _error(self, h, status, code, message, commit=None):
        body = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _find(self, repo_type, repo_id, revision):
        """files of a repo at a revision, or an error tuple like the hub's"""
        known = [k for k in self.repos if k[0] == repo_type and k[1] == repo_id]
        if not known:
            return None, (401, "RepoNotFound", "Repository not found")
        files = self.repos.get((repo_type, repo_id, revision))
        if files is None:
            return None, (404, "RevisionNotFound", "Invalid rev id: " + revision)
        return files, None

    def _handle(self, h, head):
        parts = urlsplit(h.path)
        path = unquote(parts.path)
        if path.startswith("/api/"):
            return self._api(h, path[len("/api/"):])
        repo_type = "model"
        if path.startswith("/datasets/"):
            repo_type, path = "dataset", path[len("/datasets/"):]
        if "/resolve/" not in path:
            return self._error(h, 404, "NotFound", "unknown route")
        repo_id, rest = path.lstrip("/").split("/resolve/", 1)
        revision, _, file = rest.partition("/")
        with self._lock:
            self.log.append((h.command, repo_id, file, h.headers.get("Range")))
        files, err = self._find(repo_type, repo_id, revision)
        if err:
            return self._error(h, *err)
        if file not in files:
            return self._error(h, 404, "EntryNotFound", f"{file} does not exist on {revision}", commit=revision)

        data = files[file]
        etag = etag_of(file, data)
        if file in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]  # same size, same ETag: only a hash check can tell
        start, status = 0, 200
        rng = h.headers.get("Range")
        if rng and not head and rng.startswith("bytes="):
            a, _, b = rng[len("bytes="):].partition("-")
            start, end = int(a), (int(b) if b else len(data) - 1)
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            data, status = data[start:end + 1], 206
        h.send_response(status)
        h.send_header("X-Repo-Commit", revision)
        h.send_header("ETag", f'"{etag}"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(data)))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/{len(files[file])}")
        h.end_headers()
        if head:
            return
        if file in self.drop_once and status == 200:
            self.drop_once.discard(file)
            h.wfile.write(data[: len(data) // 2])  # Content-Length promised all of it: the client sees a short body
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(data)

    def _api(self, h, rest):
        # {models|datasets}/{org}/{name}/{revision|tree}/{rev}[/{path}]
        with self._lock:
            self.log.append((h.command, None, "/api/" + rest, None))
        kind, _, rest = rest.partition("/")
        repo_type = {"models": "model", "datasets": "dataset"}.get(kind)
        bits = rest.split("/")
        if repo_type is None or len(bits) < 4 or bits[2] not in ("revision", "tree"):
            return self._error(h, 404, "NotFound", "unknown route")
        repo_id, route, revision, sub = "/".join(bits[:2]), bits[2], bits[3], "/".join(bits[4:])
        files, err = self._find(repo_type, repo_id, revision)
        if err:
            return self._error(h, *err)
        if route == "revision":
            body = {"id": repo_id, "sha": revision, "siblings": [{"rfilename": p} for p in sorted(files)]}
        else:
            body = []
            for p in sorted(files):
                if sub and not p.startswith(sub.rstrip("/") + "/"):
                    continue
                d = files[p]
                entry = {"type": "file", "oid": hashlib.sha1(b"blob %d\0" % len(d) + d).hexdigest(),
                         "size": len(d), "path": p}
                if p.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 134}
                body.append(entry)
        raw = json.dumps(body).encode()
        h.send_response(200)
        h.send_header("X-Repo-Commit", revision)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        h.wfile.write(raw)
