"""A small Hugging Face Hub look-alike, for the tests and the demo.

`LocalHub` serves, on 127.0.0.1, just enough of the Hub HTTP API for the real `huggingface_hub`
client to create repos, push commits (to `main` or to branches) and download files, revisions and
snapshots. The server is stdlib-only; `redirect_hub`, `offline` and `serve_hub` point the
(already imported) client at it.

    with serve_hub(tmp_path, token="hf_test") as hub:
        HfApi().upload_folder(repo_id="me/model", folder_path=..., ...)
        path = hf_hub_download("me/model", "config.json")
        assert hub.files("me/model")["config.json"] == ...

From a shell, ``python scripts/hub_server.py DIR`` serves the repos stored in DIR until stopped and
prints the URL to put in ``HF_ENDPOINT`` (writes need any token, e.g. ``HF_TOKEN=hf_local``).

Pull requests: `create_pr=True` (a commit with `?create_pr=1`, or `create_pull_request` then
commits to its `refs/pr/N`) opens one against main; its files resolve at revision "refs/pr/N" and
`pull_requests(repo_id)` lists them. Simplifications: every file is a "regular" (non-LFS, non-Xet)
upload; commit shas are random (not content hashes); PRs are never merged; no tags; repo ids
always have a namespace ("ns/name").
Like the real Hub, a new repo starts with an "initial commit" holding a `.gitattributes` file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

USER = "test-user"  # namespace used by create_repo when repo_id has none (as the Hub uses the caller's)
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}  # /api/{plural}/...
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}  # /{prefix}{repo_id}/resolve/...


def git_blob_oid(data: bytes) -> str:
    """Git's blob sha1: what the client computes for regular files to detect unchanged uploads."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    # The client's parse_datetime expects exactly this shape: 2024-01-31T12:00:00.000Z
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """An error answer. `code` goes into X-Error-Code, which the client maps to its exceptions."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, str]  # path in repo -> blob oid (full tree, not a diff)


@dataclass
class Repo:
    type: str
    id: str
    private: bool
    created: str
    branches: dict[str, str] = field(default_factory=dict)  # branch name (or "refs/pr/N") -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)  # every commit ever made, so old shas resolve
    discussions: list[dict] = field(default_factory=list)  # pull requests: num, title, description, created

    def resolve(self, revision: str) -> Commit:
        """A branch name or a full commit sha."""
        commit = self.commits.get(self.branches.get(revision, revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit


class LocalHub:
    """Hub-compatible HTTP server in a background thread.

    root: folder for blobs and state (a LocalHub restarted on the same root sees the same repos);
          None keeps everything in memory.
    Test knobs/inspection: `fail_commits` (commit endpoint answers 500), `last_authorization`
    (last Authorization header seen, None if none was ever sent), `requests` ([(method, path)]),
    `files(repo_id, revision)` (server-side content).
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else None
        self.repos: dict[tuple[str, str], Repo] = {}
        self.fail_commits = False
        self.last_authorization: str | None = None
        self.requests: list[tuple[str, str]] = []
        self._blobs: dict[str, bytes] = {}  # only used without root
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        if self.root is not None and (self.root / "state.json").exists():
            for data in json.loads((self.root / "state.json").read_text())["repos"]:
                repo = Repo(**data)
                repo.commits = {sha: Commit(**c) for sha, c in repo.commits.items()}
                self.repos[repo.type, repo.id] = repo

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> LocalHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # port 0: any free port
        self._server.hub = self  # type: ignore[attr-defined]
        # A short poll interval makes stop() (which waits for the next poll) fast.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), name="LocalHub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- storage ---------------------------------------------------------------------------------
    def _put_blob(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        if self.root is None:
            self._blobs[oid] = data
        else:
            path = self.root / "blobs" / oid
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return oid

    def _blob(self, oid: str) -> bytes:
        return self._blobs[oid] if self.root is None else (self.root / "blobs" / oid).read_bytes()

    def _save(self) -> None:
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            state = {"repos": [asdict(repo) for repo in self.repos.values()]}
            (self.root / "state.json").write_text(json.dumps(state, indent=1))

    def _new_commit(self, repo: Repo, branch: str, files: dict[str, str], title: str, message: str = "") -> Commit:
        commit = Commit(secrets.token_hex(20), repo.branches.get(branch), title, message, _now(), files)
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        self._save()
        return commit

    def pull_requests(self, repo_id: str, repo_type: str = "model") -> list[dict]:
        """The pull requests of a repo: ``{"num", "title", "ref"}`` each, oldest first."""
        with self._lock:
            return [{"num": d["num"], "title": d["title"], "ref": f"refs/pr/{d['num']}"}
                    for d in self.repos[repo_type, repo_id].discussions]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Server-side content of a revision, for assertions that bypass the client."""
        with self._lock:
            commit = self.repos[repo_type, repo_id].resolve(revision)
            return {path: self._blob(oid) for path, oid in commit.files.items()}

    # -- request handling ------------------------------------------------------------------------
    def _handle(self, method: str, path: str, query: dict, auth: str | None, body: bytes):
        """Returns (status, payload: bytes | JSON-able, headers) or raises HubError."""
        with self._lock:
            self.requests.append((method, path))
            if auth is not None:
                self.last_authorization = auth
            # Split before unquoting: revisions are quoted with safe="" so "a/b" arrives as "a%2Fb".
            segs = [unquote(s) for s in path.strip("/").split("/")]
            if segs[0] == "api":
                return self._api(method, segs[1:], query, auth, body)
            # /[datasets/|spaces/]{namespace}/{name}/resolve/{revision}/{path/in/repo}
            repo_type = "model"
            if segs[0] in ("datasets", "spaces") and len(segs) > 3 and segs[3] == "resolve":
                repo_type, segs = REPO_TYPES[segs[0]], segs[1:]
            if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
                repo = self._repo(repo_type, f"{segs[0]}/{segs[1]}", auth)
                return self._resolve(repo, segs[3], "/".join(segs[4:]))
            raise HubError(404, f"LocalHub has no route for {method} {path}")

    def _repo(self, repo_type: str, repo_id: str, auth: str | None) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and auth is None):
            # Like the Hub: 401 when unauthenticated, so private repos look the same as missing ones.
            raise HubError(401 if auth is None else 404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _require_token(auth: str | None) -> None:
        if auth is None:
            raise HubError(401, "You must be authenticated to write to the Hub (no token sent)")

    def _api(self, method: str, segs: list[str], query: dict, auth: str | None, body: bytes):
        if method == "POST" and segs == ["repos", "create"]:
            return self._create_repo(json.loads(body), auth)
        if method == "POST" and segs == ["validate-yaml"]:
            return 200, {"errors": [], "warnings": []}, {}  # front matter is not checked
        if len(segs) < 3 or segs[0] not in REPO_TYPES:
            raise HubError(404, f"LocalHub has no route for {method} /api/{'/'.join(segs)}")
        repo = self._repo(REPO_TYPES[segs[0]], f"{segs[1]}/{segs[2]}", auth)
        action, args = (segs[3], segs[4:]) if len(segs) > 3 else ("", [])
        if action == "discussions":
            return self._discussions(repo, method, args, auth, body)
        revision = "/".join(args[:1]) or "main"
        if method == "GET" and action in ("", "revision"):
            return 200, self._info(repo, revision), {}
        if method == "GET" and action == "tree":
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return 200, self._tree(repo, revision, "/".join(args[1:]), recursive), {}
        if method == "GET" and action == "refs":
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in repo.branches.items()
                        if not b.startswith("refs/pr/")]
            prs = [{"name": b, "ref": b, "targetCommit": sha} for b, sha in repo.branches.items()
                   if b.startswith("refs/pr/")]
            return 200, {"branches": branches, "converts": [], "tags": [], "pullRequests": prs}, {}
        if method == "GET" and action == "commits":
            return 200, self._history(repo, revision), {}
        if method == "POST" and action == "preupload":
            files = repo.resolve(revision).files
            # Always "regular": content then travels base64-encoded inside the commit, no LFS/Xet.
            # The oid lets the client skip files that did not change, as with the real Hub.
            answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": files.get(f["path"])}
                      for f in json.loads(body)["files"]]
            return 200, {"files": answer}, {}
        if method == "POST" and action == "commit":
            return self._commit(repo, revision, query, auth, body)
        if method == "POST" and action == "branch":
            return self._branch(repo, revision, json.loads(body or b"{}"), auth)
        raise HubError(404, f"LocalHub has no route for {method} /api/{'/'.join(segs)}")

    def _create_repo(self, payload: dict, auth: str | None):
        self._require_token(auth)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.url}/{URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.repos:
            return 409, {"error": "You already created this repo", "url": url}, {}
        repo = Repo(repo_type, repo_id, payload.get("visibility") == "private", _now())
        self.repos[repo_type, repo_id] = repo
        self._new_commit(repo, "main", {".gitattributes": self._put_blob(GITATTRIBUTES)}, "initial commit")
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _branch(self, repo: Repo, branch: str, payload: dict, auth: str | None):
        self._require_token(auth)
        if branch in repo.branches:  # 409 is what create_branch(exist_ok=True) tolerates
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        repo.branches[branch] = repo.resolve(payload.get("startingPoint") or "main").sha
        self._save()
        return 200, {}, {}

    def _commit(self, repo: Repo, branch: str, query: dict, auth: str | None, body: bytes):
        self._require_token(auth)
        if self.fail_commits:
            raise HubError(500, "Internal error (LocalHub.fail_commits is set)")
        if branch not in repo.branches:  # cannot commit on top of a sha, only to an existing branch
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        head = repo.commits[repo.branches[branch]]
        files, title, message = dict(head.files), "", ""
        # NDJSON: one {"key": ..., "value": ...} per line; nothing is stored until all lines parse.
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                title, message = value.get("summary", ""), value.get("description", "")
                if value.get("parentCommit") and not head.sha.startswith(value["parentCommit"]):
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                files[value["path"]] = self._put_blob(base64.b64decode(value["content"]))
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: oid for p, oid in files.items() if not p.startswith(prefix)}
            else:  # lfsFile / copy: never requested since preupload answers "regular"
                raise HubError(400, f"LocalHub does not support {key!r} commit operations")
        pr_url = None
        if query.get("create_pr", ["0"])[0] in ("1", "true"):  # a new PR against `branch`, this commit on it
            num = self._open_pr(repo, title, message, base=branch)
            branch, pr_url = f"refs/pr/{num}", f"{self.url}/{URL_PREFIX[repo.type]}{repo.id}/discussions/{num}"
        commit = self._new_commit(repo, branch, files, title, message)
        commit_url = f"{self.url}/{URL_PREFIX[repo.type]}{repo.id}/commit/{commit.sha}"
        return 200, {"success": True, "commitOid": commit.sha, "commitUrl": commit_url, "pullRequestUrl": pr_url}, {}

    def _open_pr(self, repo: Repo, title: str, description: str, base: str = "main") -> int:
        """A pull request against ``base``: its ref refs/pr/N starts at base's head."""
        num = len(repo.discussions) + 1
        repo.discussions.append({"num": num, "title": title, "description": description, "created": _now()})
        repo.branches[f"refs/pr/{num}"] = repo.branches[base]
        self._save()
        return num

    def _discussions(self, repo: Repo, method: str, args: list[str], auth: str | None, body: bytes):
        """Pull requests only: POST .../discussions {"pullRequest": true} opens one, GET
        .../discussions/N describes it as `get_discussion_details` reads it."""
        if method == "POST" and not args:
            self._require_token(auth)
            payload = json.loads(body or b"{}")
            if not payload.get("pullRequest"):
                raise HubError(400, "LocalHub supports pull requests, not discussions")
            num = self._open_pr(repo, payload.get("title", ""), payload.get("description", ""))
            return 200, {"num": num, "url": f"{self.url}/{URL_PREFIX[repo.type]}{repo.id}/discussions/{num}"}, {}
        if method == "GET" and len(args) == 1 and args[0].isdigit() and 0 < int(args[0]) <= len(repo.discussions):
            d = repo.discussions[int(args[0]) - 1]
            return 200, {"num": d["num"], "title": d["title"], "status": "open", "isPullRequest": True,
                         "createdAt": d["created"], "author": {"name": USER}, "events": [],
                         "repo": {"name": repo.id, "type": repo.type}, "filesWithConflicts": [],
                         "changes": {"base": "refs/heads/main"}}, {}
        raise HubError(404, "Discussion not found")

    def _blob_size(self, oid: str) -> int:
        return len(self._blobs[oid]) if self.root is None else (self.root / "blobs" / oid).stat().st_size

    def _resolve(self, repo: Repo, revision: str, filename: str):
        commit = repo.resolve(revision)
        headers = {"X-Repo-Commit": commit.sha}  # also on EntryNotFound: the client caches the miss per commit
        oid = commit.files.get(filename)
        if oid is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers)
        # The client needs X-Repo-Commit and ETag (it refuses files without them) and uses
        # Content-Length, which the HEAD answer carries as well, as the expected size.
        headers.update({"ETag": f'"{oid}"', "Content-Type": "application/octet-stream"})
        return 200, self._blob(oid), headers

    def _info(self, repo: Repo, revision: str) -> dict:
        commit = repo.resolve(revision)
        siblings = [{"rfilename": path, "size": self._blob_size(oid), "blobId": oid}
                    for path, oid in sorted(commit.files.items())]
        return {"id": repo.id, "author": repo.id.split("/")[0], "sha": commit.sha, "private": repo.private,
                "gated": False, "disabled": False, "lastModified": commit.date, "createdAt": repo.created,
                "tags": [], "downloads": 0, "likes": 0, "siblings": siblings}

    def _tree(self, repo: Repo, revision: str, folder: str, recursive: bool) -> list[dict]:
        commit = repo.resolve(revision)
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries: dict[str, dict] = {}
        for path, oid in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                sub = prefix + "/".join(parts[:depth])
                sub_oid = hashlib.sha1(f"{commit.sha}:{sub}".encode()).hexdigest()  # opaque, stable per commit
                entries.setdefault(sub, {"type": "directory", "oid": sub_oid, "size": 0, "path": sub})
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "oid": oid, "size": self._blob_size(oid), "path": path}
        if prefix and not entries:
            raise HubError(404, f"Entry not found: {folder}", "EntryNotFound")
        return list(entries.values())

    def _history(self, repo: Repo, revision: str) -> list[dict]:
        commit, history = repo.resolve(revision), []
        while commit is not None:
            history.append({"id": commit.sha, "title": commit.title, "message": commit.message,
                            "authors": [{"user": USER}], "date": commit.date})
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return history


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0 closes every connection after one answer: no pooled keep-alive connection of the
    # client can outlive stop() and keep being served by a lingering handler thread.
    protocol_version = "HTTP/1.0"
    server_version = "LocalHub/1.0"

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            status, payload, headers = self.server.hub._handle(  # type: ignore[attr-defined]
                self.command, url.path, parse_qs(url.query), self.headers.get("Authorization"), body)
        except HubError as e:
            status, payload, headers = e.status, {"error": e.message}, e.headers
        except Exception as e:  # a LocalHub bug: answer 500 so the test fails visibly, with the trace
            traceback.print_exc()
            status, payload, headers = 500, {"error": f"LocalHub internal error: {e!r}"}, {}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers, "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = _dispatch

    def log_message(self, format, *args) -> None:
        pass  # keep test output quiet


# -- pointing the client at a LocalHub --------------------------------------------------------------
@contextmanager
def _patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextmanager
def _env(name: str, value: str | None):
    old = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if old is not None:
            os.environ[name] = old


@contextmanager
def redirect_hub(url: str, cache_dir: str | os.PathLike, token: str | None = None):
    """Point the imported huggingface_hub at `url` and a private cache.

    huggingface_hub reads HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE only at import, so this
    patches the resulting configuration values, plus the copies made at import time:
    `hf_api.api` (the HfApi behind module-level functions such as `create_repo`, `model_info`)
    and `utils._cache_manager.HF_HUB_CACHE`. file_download/snapshot_download read `constants.*`
    at call time. The user's own token (HF_TOKEN, token file) is hidden; `token`, if given,
    becomes HF_TOKEN so calls without an explicit token are authenticated.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _cache_manager

    cache_dir = str(Path(cache_dir).resolve())
    with ExitStack() as stack:
        for obj, name, value in [
            (constants, "ENDPOINT", url),
            (constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"),
            (constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {urlsplit(url).hostname}),
            (constants, "HF_HUB_CACHE", cache_dir),
            (_cache_manager, "HF_HUB_CACHE", cache_dir),
            (constants, "HF_HUB_OFFLINE", False),
            (constants, "HF_HUB_DISABLE_XET", True),  # belt and braces: LocalHub never offers Xet
            (constants, "HF_TOKEN_PATH", os.path.join(cache_dir, ".no-token")),  # never read a real token
            (hf_api.api, "endpoint", url),
        ]:
            stack.enter_context(_patched(obj, name, value))
        for name in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            stack.enter_context(_env(name, None))
        stack.enter_context(_env("HF_TOKEN", token))
        yield


@contextmanager
def offline():
    """HF_HUB_OFFLINE=1 for the imported client: every request raises OfflineModeIsEnabled
    (checked per request via constants.is_offline_mode()), so downloads must come from cache."""
    from huggingface_hub import constants

    with _patched(constants, "HF_HUB_OFFLINE", True), _env("HF_HUB_OFFLINE", "1"):
        yield


@contextmanager
def serve_hub(tmp_dir: str | os.PathLike, token: str | None = "hf_test"):
    """A running LocalHub stored in tmp_dir/hub, with the client redirected to it and caching in
    tmp_dir/hf-cache. Typical fixture: `with serve_hub(tmp_path) as hub: yield hub`."""
    with LocalHub(Path(tmp_dir) / "hub") as hub, redirect_hub(hub.url, Path(tmp_dir) / "hf-cache", token):
        yield hub


if __name__ == "__main__":
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Serve a local Hub look-alike on 127.0.0.1 until stopped.")
    parser.add_argument("root", help="folder holding the repos (created; a later start sees the same repos)")
    with LocalHub(parser.parse_args().root) as hub:
        print(f"HF_ENDPOINT={hub.url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
