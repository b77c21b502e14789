"""A loopback stand-in for the Hugging Face Hub: the part of its HTTP API that huggingface_hub uses
to create a repository, commit files (regular and LFS), and download them again.

Written for cure-hub's tests, so that pushing and loading go through the real huggingface_hub,
timm and transformers clients. It keeps everything in memory and serves 127.0.0.1 only.

Tokens: ``hf_write`` may write, ``hf_read`` may only read; any other token, or none, is refused
with 401 where a token is needed. Every repository belongs to the user ``tester``. A commit can be
made to fail on cue (``HubState.faults``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

TOKENS = {"hf_write": "write", "hf_read": "read"}


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, repo_id: str, private: bool):
        self.repo_id, self.private = repo_id, private
        self.commits: dict[str, dict[str, dict]] = {}  # commit oid -> path -> file entry
        self.refs: dict[str, str | None] = {"main": None}
        self.pull_requests = 0
        self.discussions: list[dict] = []  # as the Hub lists them, with each pull request's description

    def files(self, revision: str) -> dict[str, dict] | None:
        oid = self.refs.get(revision, revision if revision in self.commits else None)
        if revision in self.refs and oid is None:
            return {}
        return self.commits.get(oid) if oid else None

    def head(self, revision: str) -> str | None:
        return self.refs.get(revision, revision if revision in self.commits else None)


class HubState:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        #: Faults on cue, by route ("commit"): an HTTP status to answer, or "drop" to close the
        #: connection unanswered (a server gone mid-push); each is used once.
        self.faults: dict[str, int | str] = {}


class Handler(BaseHTTPRequestHandler):
    server_version = "LoopbackHub/1.0"
    protocol_version = "HTTP/1.1"

    # ---- plumbing ---------------------------------------------------------------------------
    @property
    def hub(self) -> HubState:
        return self.server.hub

    def log_message(self, *args):  # keep test output quiet
        pass

    def _role(self) -> str | None:
        header = self.headers.get("Authorization", "")
        return TOKENS.get(header.removeprefix("Bearer ").strip()) if header.startswith("Bearer ") else None

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None):
        if body is None:
            body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers=headers)

    def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        role = self._role()
        if repo is None or (repo.private and role is None):
            self._error(404 if role else 401, f"Repository {repo_id} not found", "RepoNotFound")
            return None
        if write and role != "write":
            self._error(403 if role else 401, "You don't have the rights to write to this repository")
            return None
        return repo

    def _route(self):
        self.hub.requests.append((self.command, self.path))
        url = urllib.parse.urlsplit(self.path)
        return urllib.parse.unquote(url.path).strip("/").split("/"), urllib.parse.parse_qs(url.query)

    # ---- GET / HEAD -------------------------------------------------------------------------
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        parts, query = self._route()
        if parts[:2] == ["api", "whoami-v2"]:
            role = self._role()
            if role is None:
                return self._error(401, "Invalid credentials in Authorization header")
            return self._send(200, {"type": "user", "name": "tester", "fullname": "Tester", "orgs": [],
                                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}}})
        if parts[:2] == ["api", "models"] and len(parts) == 5 and parts[4] == "discussions":
            return self._discussions("/".join(parts[2:4]), query)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = "/".join(parts[2:4])
            revision = parts[5] if len(parts) >= 6 and parts[4] == "revision" else "main"
            return self._model_info(repo_id, revision)
        if "resolve" in parts:
            index = parts.index("resolve")
            # A pull request's revision, refs/pr/N, arrives quoted but is split with the path.
            length = 3 if parts[index + 1:index + 3] == ["refs", "pr"] else 1
            return self._resolve("/".join(parts[:index]), "/".join(parts[index + 1:index + 1 + length]),
                                 "/".join(parts[index + 1 + length:]))
        if parts[0] == "lfs-objects" and len(parts) == 2 and parts[1] in self.hub.lfs:
            return self._send(200, body=self.hub.lfs[parts[1]], headers={"Content-Type": "application/octet-stream"})
        self._error(404, f"no route for GET {self.path}")

    def _discussions(self, repo_id: str, query: dict):
        """A repository's discussions and pull requests, filtered as ``HfApi.get_repo_discussions`` asks."""
        repo = self._repo(repo_id)
        if repo is None:
            return
        wanted = {key: query[key][0] for key in ("author", "type", "status") if key in query and query[key][0] != "all"}
        listed = [d for d in repo.discussions
                  if wanted.get("author", d["author"]["name"]) == d["author"]["name"]
                  and wanted.get("status", d["status"]) == d["status"]
                  and wanted.get("type", "pull_request" if d["isPullRequest"] else "discussion") == ("pull_request" if d["isPullRequest"] else "discussion")]
        self._send(200, {"discussions": listed, "count": len(listed), "start": 0, "numClosedDiscussions": 0})

    def _model_info(self, repo_id: str, revision: str):
        repo = self._repo(repo_id)
        if repo is None:
            return
        files = repo.files(revision)
        if files is None:
            return self._error(404, f"Revision {revision} not found", "RevisionNotFound")
        card = files.get("README.md")
        card_data = None
        if card is not None:
            text = self._content(card).decode()
            if text.startswith("---"):
                card_data = yaml.safe_load(text.split("---")[1])
        self._send(200, {
            "id": repo_id, "modelId": repo_id, "sha": repo.head(revision), "private": repo.private, "author": repo_id.split("/")[0],
            "siblings": [{"rfilename": path} for path in sorted(files)], "tags": (card_data or {}).get("tags", []),
            "cardData": card_data, "library_name": (card_data or {}).get("library_name"), "downloads": 0, "likes": 0,
        })

    def _content(self, entry: dict) -> bytes:
        return self.hub.lfs[entry["lfs_oid"]] if "lfs_oid" in entry else entry["data"]

    def _resolve(self, repo_id: str, revision: str, path: str):
        repo = self._repo(repo_id)
        if repo is None:
            return
        files = repo.files(urllib.parse.unquote(revision))
        if files is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        entry = files.get(path)
        if entry is None:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound")
        data = self._content(entry)
        headers = {"X-Repo-Commit": repo.head(urllib.parse.unquote(revision)) or revision,
                   "Content-Type": "application/octet-stream"}
        if "lfs_oid" in entry:
            headers.update({"ETag": f'"{entry["lfs_oid"]}"', "X-Linked-Etag": f'"{entry["lfs_oid"]}"', "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{_git_blob_sha(data)}"'
        self._send(200, body=data, headers=headers)

    # ---- POST / PUT -------------------------------------------------------------------------
    def do_POST(self):
        parts, query = self._route()
        body = self._body()
        if parts[:3] == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body))
        if parts[:2] == ["api", "validate-yaml"]:
            try:
                yaml.safe_load(json.loads(body)["content"].split("---")[1])
            except (yaml.YAMLError, IndexError) as err:
                return self._send(400, {"errors": [{"message": str(err)}]})
            return self._send(200, {"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "branch":
            return self._create_branch("/".join(parts[2:4]), urllib.parse.unquote("/".join(parts[5:])), json.loads(body or b"{}"))
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("preupload", "commit"):
            repo_id, revision = "/".join(parts[2:4]), urllib.parse.unquote("/".join(parts[5:]))
            if parts[4] == "preupload":
                return self._preupload(repo_id, json.loads(body))
            return self._commit(repo_id, revision, body, query)
        if len(parts) >= 5 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch("/".join([parts[0], parts[1].removesuffix(".git")]), json.loads(body))
        self._error(404, f"no route for POST {self.path}")

    def do_PUT(self):
        parts, _ = self._route()
        body = self._body()
        if parts[0] == "lfs-upload" and len(parts) == 2:
            if hashlib.sha256(body).hexdigest() != parts[1]:
                return self._error(400, "uploaded content does not match its oid")
            with self.hub.lock:
                self.hub.lfs[parts[1]] = body
            return self._send(200, {})
        self._error(404, f"no route for PUT {self.path}")

    def _create_repo(self, request: dict):
        if self._role() != "write":
            return self._error(401 if self._role() is None else 403, "You must use a write token to create a repository")
        repo_id = f"{request.get('organization') or 'tester'}/{request['name']}"
        url = f"{self.server.endpoint}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            self.hub.repos[repo_id] = Repo(repo_id, bool(request.get("private")) or request.get("visibility") == "private")
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _create_branch(self, repo_id: str, branch: str, request: dict):
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        with self.hub.lock:
            if branch in repo.refs:
                return self._send(409, {"error": f"Reference already exists: refs/heads/{branch}"})
            repo.refs[branch] = repo.head(request.get("startingPoint") or "main")
        self._send(200, {})

    def _preupload(self, repo_id: str, request: dict):
        if self._repo(repo_id, write=True) is None:
            return
        files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") or f["size"] > 100_000 else "regular",
                  "shouldIgnore": False, "oid": None} for f in request["files"]]
        self._send(200, {"files": files, "commitOid": None})

    def _lfs_batch(self, repo_id: str, request: dict):
        if self._repo(repo_id, write=True) is None:
            return
        objects = []
        for obj in request["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs:
                entry["actions"] = {"upload": {"href": f"{self.server.endpoint}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _commit(self, repo_id: str, revision: str, body: bytes, query: dict):
        fault = self.hub.faults.pop("commit", None)
        if fault == "drop":
            self.close_connection = True
            return
        if fault is not None:
            return self._error(fault, "Internal Error - We're working hard to fix this as soon as possible!")
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        with self.hub.lock:
            base = repo.files(revision)
            if base is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            files = dict(base)
            summary = description = ""
            for line in body.decode().splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "header":
                    summary, description = value.get("summary", ""), value.get("description", "")
                elif item["key"] == "file":
                    files[value["path"]] = {"data": base64.b64decode(value["content"])}
                elif item["key"] == "lfsFile":
                    if value["oid"] not in self.hub.lfs:
                        return self._error(400, f"LFS object {value['oid']} was not uploaded")
                    files[value["path"]] = {"lfs_oid": value["oid"]}
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    files = {p: e for p, e in files.items() if p != value["path"] and not p.startswith(value["path"].rstrip("/") + "/")}
            oid = hashlib.sha1(f"{repo_id}{len(repo.commits)}{summary}".encode()).hexdigest()
            repo.commits[oid] = files
            pull_request = None
            if query.get("create_pr", ["0"])[0] in ("1", "true", "True"):
                repo.pull_requests += 1
                repo.refs[f"refs/pr/{repo.pull_requests}"] = oid
                repo.discussions.append({
                    "num": repo.pull_requests, "title": summary, "description": description, "status": "open",
                    "author": {"name": "tester"}, "createdAt": "2026-12-07T00:00:00.000Z", "isPullRequest": True,
                    "repo": {"name": repo_id, "type": "model"}})
                pull_request = f"{self.server.endpoint}/{repo_id}/discussions/{repo.pull_requests}"
            else:
                repo.refs[revision] = oid
        self._send(200, {"commitUrl": f"{self.server.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": pull_request})


class LoopbackHub:
    """Run the stand-in in a background thread: ``with LoopbackHub() as hub: hub.endpoint``."""

    def __init__(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.hub = HubState()
        self.endpoint = self.server.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def state(self) -> HubState:
        return self.server.hub

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def hub_env(hub, home, token="hf_write", **extra) -> dict:
    """The environment of a process that talks to ``hub``: no HF_* variable of ours, a fresh
    HF_HOME, ``token`` as HF_TOKEN (none when None), one thread, and ``extra``."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1", "OMP_NUM_THREADS": "1", **extra})
    if token:
        env["HF_TOKEN"] = token
    return env


#: Run in a process with the ``hub_env`` of a loopback Hub: ``python -c LOAD_SCRIPT REPO LIBRARY OUT``
#: loads REPO through cure_hub, timm's ``hf-hub:`` (timm layout) and transformers' Auto classes,
#: on ``OUT/input.pt``, and saves every library's logits to ``OUT/logits.pt``, the card to OUT, and
#: what ``cure_hub.robust_results`` and ``load_robust_model(...).threat_model`` read from the Hub to
#: ``OUT/robust_results.json``.
LOAD_SCRIPT = """
import json, sys, torch
import cure_hub, timm
from huggingface_hub import ModelCard, hf_hub_download
from transformers import AutoModelForImageClassification
repo, library, out = sys.argv[1], sys.argv[2], sys.argv[3]
x = torch.load(out + "/input.pt")
results = {"cure_hub": cure_hub.load_robust_model(repo).eval()(x)}
config = json.load(open(hf_hub_download(repo, "config.json")))
if library == "timm":
    model = timm.create_model("hf-hub:" + repo, pretrained=True).eval()
    cfg = model.pretrained_cfg
    normalised = (x - torch.tensor(cfg["mean"]).view(1, -1, 1, 1)) / torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    results["timm"] = model(normalised)
else:
    processor = json.load(open(hf_hub_download(repo, "preprocessor_config.json")))
    normalised = (x - torch.tensor(processor["image_mean"]).view(1, -1, 1, 1)) / torch.tensor(processor["image_std"]).view(1, -1, 1, 1)
hf = AutoModelForImageClassification.from_pretrained(repo).eval()
results["transformers"] = hf(pixel_values=normalised).logits
results["transformers_labels"] = [hf.config.id2label[i] for i in range(hf.config.num_labels)]
torch.save(results, out + "/logits.pt")
open(out + "/README.md", "w").write(open(hf_hub_download(repo, "README.md")).read())
read = cure_hub.robust_results(repo)
json.dump({"results": {r.attack: r.accuracy for r in read}, "threat_model": str(cure_hub.load_robust_model(repo).threat_model)},
          open(out + "/robust_results.json", "w"))
"""
