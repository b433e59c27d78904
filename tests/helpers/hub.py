"""A stand-in for the Hugging Face Hub on loopback, so that the real huggingface_hub client (snapshot_download) can
be tested without a network: the few routes it calls, answered from folders registered with `add`.

Routes (huggingface_hub 2.x: hf_api.repo_info / list_repo_tree, file_download.get_hf_file_metadata / http_get):
  GET       /api/models/{owner}/{name}/revision/{rev}    {"id", "sha", "siblings"}
  GET       /api/models/{owner}/{name}/tree/{rev}         [{"type": "file", "path", "size", "oid"}] (one page)
  HEAD, GET /{owner}/{name}/resolve/{rev}/{file}          X-Repo-Commit, ETag, Content-Length (+ the bytes)
Errors carry the X-Error-Code header the client maps to its exceptions (RepoNotFound, RevisionNotFound, GatedRepo,
EntryNotFound).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"revisions": {name: sha}, "commits": {sha: files}, "gated"}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, to check what was fetched
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def add(self, repo_id: str, folder: str | Path, revision: str = "main", gated: bool = False) -> str:
        """Publish the files of `folder` as `revision` of `repo_id`; returns the commit sha."""
        files = {f.name: f.read_bytes() for f in sorted(Path(folder).iterdir()) if f.is_file()}
        sha = hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode()
                           + revision.encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, {"revisions": {}, "commits": {}, "gated": gated})
        repo["revisions"][revision] = sha
        repo["commits"][sha] = files
        return sha

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(hub: FakeHub):
    api = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/(?P<route>revision|tree)/(?P<rev>[^/]+)$")
    resolve = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet test output
            pass

        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path))
            m = api.match(path) or resolve.match(path)
            if m is None:
                return self._error(404, "EntryNotFound", body)
            repo = hub.repos.get(m["repo"])
            if repo is None:
                return self._error(404, "RepoNotFound", body)
            sha = repo["revisions"].get(m["rev"]) or (m["rev"] if m["rev"] in repo["commits"] else None)
            if sha is None:
                return self._error(404, "RevisionNotFound", body)
            files = repo["commits"][sha]
            if "file" not in m.groupdict():
                if m["route"] == "revision":
                    data = {"id": m["repo"], "sha": sha, "siblings": [{"rfilename": f} for f in files]}
                else:
                    data = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                            for f, b in files.items()]
                return self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"}, body)
            if repo["gated"]:  # the Hub lists a gated repo's files but serves them only to accepted users
                return self._error(403, "GatedRepo", body)
            if m["file"] not in files:
                return self._error(404, "EntryNotFound", body)
            data = files[m["file"]]
            self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                                   "Content-Type": "application/octet-stream"}, body)

        def _error(self, status: int, code: str, body: bool) -> None:
            self._send(status, json.dumps({"error": code}).encode(),
                       {"X-Error-Code": code, "X-Error-Message": code, "Content-Type": "application/json"}, body)

        def _send(self, status: int, data: bytes, headers: dict, body: bool) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler


def use_hub(monkeypatch, url: str | None, cache: str | Path, offline: bool = False) -> None:
    """Point this process's huggingface_hub at `url` (None: leave the endpoint) with its cache in `cache`.
    huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE once, on import: set its constants."""
    from huggingface_hub import constants

    if url is not None:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


def hub_env(url: str, home: str | Path, offline: bool = False) -> dict:
    """The environment that points a `zamba2` subprocess's huggingface_hub at `url`, its cache under `home`."""
    return {"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1" if offline else "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
