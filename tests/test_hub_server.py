"""The real huggingface_hub client, over real HTTP, against scripts/hub_server.py's LocalHub."""

import json
import random
import re
from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    create_repo,
    hf_hub_download,
    model_info,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hub_server import LocalHub, offline, serve_hub

REPO = "eqzoo-test/tiny-model"
SHA = re.compile(r"^[0-9a-f]{40}$")
README = "---\nlicense: apache-2.0\nlibrary_name: timm\ntags:\n- image-classification\n---\n\n# tiny\n"


@pytest.fixture
def hub(tmp_path):
    with serve_hub(tmp_path, token="hf_test") as hub:
        yield hub


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.url, token="hf_test")


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 10}))
    (folder / "model.safetensors").write_bytes(random.Random(0).randbytes(100_000))
    (folder / "README.md").write_text(README)
    return folder


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def push(api, folder, **kwargs):
    api.create_repo(REPO, private=True, exist_ok=True)
    return api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="add model", **kwargs)


def test_push_then_download_each_file(hub, api, model_dir):
    url = api.create_repo(REPO, private=True, exist_ok=True)
    assert url.repo_id == REPO and url.endpoint == hub.url
    api.create_repo(REPO, exist_ok=True)  # second create: 409, swallowed by exist_ok
    info = api.upload_folder(repo_id=REPO, folder_path=model_dir, commit_message="add model")
    assert SHA.match(info.oid) and info.repo_url.repo_id == REPO
    assert hub.last_authorization == "Bearer hf_test"

    expected = local_files(model_dir)
    assert {k: v for k, v in hub.files(REPO).items() if k != ".gitattributes"} == expected
    for name, content in expected.items():
        # Module-level function, no endpoint argument: goes through redirect_hub.
        path = hf_hub_download(REPO, name)
        assert Path(path).read_bytes() == content
        assert f"snapshots/{info.oid}/" in path

    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", *expected])
    assert model_info(REPO).sha == info.oid
    assert {s.rfilename for s in api.model_info(REPO).siblings} == {".gitattributes", *expected}
    assert api.repo_exists(REPO) and not api.repo_exists("eqzoo-test/nope")
    assert api.file_exists(REPO, "config.json") and not api.file_exists(REPO, "nope.json")


def test_second_push_keeps_old_revision_resolvable(api, model_dir):
    first = push(api, model_dir)
    old_config = (model_dir / "config.json").read_bytes()
    (model_dir / "config.json").write_text(json.dumps({"architecture": "resnet50"}))
    second = push(api, model_dir)
    assert second.oid != first.oid

    assert Path(hf_hub_download(REPO, "config.json")).read_bytes() == (model_dir / "config.json").read_bytes()
    assert Path(hf_hub_download(REPO, "config.json", revision=first.oid)).read_bytes() == old_config
    assert [c.commit_id for c in api.list_repo_commits(REPO)][:2] == [second.oid, first.oid]

    # Pushing unchanged files: the client compares git oids from /preupload and skips the commit.
    assert push(api, model_dir).oid == second.oid


def test_branch_revision(hub, api, model_dir):
    main = push(api, model_dir)
    api.create_branch(REPO, branch="exp/v2")  # "/" in a branch name travels URL-quoted
    api.create_branch(REPO, branch="exp/v2", exist_ok=True)
    pushed = api.upload_file(path_or_fileobj=b'{"v": 2}', path_in_repo="config.json", repo_id=REPO,
                             revision="exp/v2", commit_message="v2")

    assert Path(hf_hub_download(REPO, "config.json", revision="exp/v2")).read_bytes() == b'{"v": 2}'
    assert Path(hf_hub_download(REPO, "config.json")).read_bytes() == (model_dir / "config.json").read_bytes()
    assert api.model_info(REPO, revision="exp/v2").sha == pushed.oid
    assert api.model_info(REPO).sha == main.oid
    assert {b.name for b in api.list_repo_refs(REPO).branches} == {"main", "exp/v2"}
    with pytest.raises(RevisionNotFoundError):  # committing to a branch that does not exist
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=REPO, revision="nope", commit_message="x")


def test_delete_file(api, model_dir):
    push(api, model_dir)
    api.delete_file("README.md", repo_id=REPO, commit_message="rm readme")
    assert "README.md" not in api.list_repo_files(REPO)
    with pytest.raises(EntryNotFoundError):
        api.delete_file("README.md", repo_id=REPO, commit_message="rm again")


def test_snapshot_download(api, model_dir, tmp_path):
    first = push(api, model_dir)
    (model_dir / "sub").mkdir()
    (model_dir / "sub" / "extra.txt").write_text("nested")
    push(api, model_dir)

    latest = Path(snapshot_download(REPO))
    assert {k: v for k, v in local_files(latest).items() if k != ".gitattributes"} == local_files(model_dir)
    pinned = Path(snapshot_download(REPO, revision=first.oid, local_dir=tmp_path / "pinned"))
    assert "sub/extra.txt" not in local_files(pinned) and "config.json" in local_files(pinned)
    tree = {e.path for e in api.list_repo_tree(REPO)}  # not recursive: the folder, not its files
    assert "sub" in tree and "sub/extra.txt" not in tree


def test_errors(api, model_dir):
    push(api, model_dir)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("eqzoo-test/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("eqzoo-test/missing")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("eqzoo-test/missing")
    with pytest.raises(EntryNotFoundError) as err:  # RemoteEntryNotFoundError in this client version
        hf_hub_download(REPO, "missing.json")
    assert isinstance(err.value, RemoteEntryNotFoundError)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="0" * 40)
    # Private repo, anonymous caller (not force_download: the client turns that error into a ValueError).
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "config.json", token=False)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info(REPO)
    with pytest.raises(HfHubHTTPError) as err:  # writes need a token
        HfApi(token=False).create_repo("eqzoo-test/anon")
    assert err.value.response.status_code == 401


def test_offline_reads_from_cache(hub, api, model_dir):
    push(api, model_dir)
    cached = hf_hub_download(REPO, "model.safetensors")
    snapshot = snapshot_download(REPO)
    seen = len(hub.requests)
    with offline():
        assert hf_hub_download(REPO, "model.safetensors") == cached
        assert snapshot_download(REPO) == snapshot
        assert len(hub.requests) == seen  # offline: not a single request reached the server
    hub.stop()
    with offline():
        weights = Path(hf_hub_download(REPO, "model.safetensors")).read_bytes()
        assert weights == (model_dir / "model.safetensors").read_bytes()
        with pytest.raises(LocalEntryNotFoundError):
            hf_hub_download(REPO, "never-downloaded.bin")
    # Server gone, not offline: the client falls back to the cache as well.
    assert hf_hub_download(REPO, "model.safetensors") == cached


def test_failed_commit_raises_and_keeps_local_files(hub, api, model_dir):
    first = push(api, model_dir)
    before = local_files(model_dir)
    (model_dir / "config.json").write_text("{}")
    hub.fail_commits = True
    with pytest.raises(HfHubHTTPError) as err:
        push(api, model_dir)
    assert err.value.response.status_code == 500
    assert local_files(model_dir) == {**before, "config.json": b"{}"}
    assert api.model_info(REPO).sha == first.oid  # nothing landed on the server


def test_state_survives_restart(tmp_path, model_dir):
    with serve_hub(tmp_path) as hub:
        pushed = push(HfApi(), model_dir)
    with LocalHub(tmp_path / "hub") as hub:
        assert hub.files(REPO, pushed.oid)["config.json"] == (model_dir / "config.json").read_bytes()


def test_create_repo_without_namespace_uses_user(api):
    url = create_repo("bare-name", token="hf_test")
    assert url.repo_id == "test-user/bare-name"
    assert api.repo_exists("test-user/bare-name")


def test_pull_requests(hub, api, model_dir):
    main = push(api, model_dir)
    (model_dir / "config.json").write_text(json.dumps({"architecture": "resnet50"}))
    pr = api.upload_folder(repo_id=REPO, folder_path=model_dir, commit_message="propose resnet50", create_pr=True)
    assert pr.pr_num == 1 and pr.pr_revision == "refs/pr/1" and pr.pr_url.endswith(f"{REPO}/discussions/1")
    assert api.model_info(REPO).sha == main.oid  # main did not move
    assert json.loads(Path(hf_hub_download(REPO, "config.json", revision="refs/pr/1")).read_text()) == \
        {"architecture": "resnet50"}
    assert hub.pull_requests(REPO) == [{"num": 1, "title": "propose resnet50", "ref": "refs/pr/1"}]
    assert [r.ref for r in api.list_repo_refs(REPO, include_pull_requests=True).pull_requests] == ["refs/pr/1"]
    assert {b.name for b in api.list_repo_refs(REPO).branches} == {"main"}
    # a single commit with ?create_pr=1 (the client's create_commit) opens a second one
    second = api.create_commit(REPO, operations=[CommitOperationAdd("extra.txt", b"x")], commit_message="extra",
                               create_pr=True)
    assert second.pr_revision == "refs/pr/2" and hub.files(REPO, "refs/pr/2")["extra.txt"] == b"x"
    assert "extra.txt" not in hub.files(REPO)
