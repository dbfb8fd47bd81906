"""Remote stores: push/pull round trips, the manifest as the publication step, refused corruption and unsafe archives,
concurrent pushes, read-through runs, status marks and location independence.

Every test runs twice: against a local-folder remote and against a real S3 endpoint (moto's server mode on 127.0.0.1,
reached through s3fs, the client a user points at AWS or MinIO). No traffic leaves the loopback interface.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import zstandard
from luigi.task_register import Register
from pipeline_conftest_helpers import PROJECT, fake_env  # noqa: F401  (fixture)
from pipeline_fakes import FkAll, FkLeaf, FkMid, FkSide, FkSource, calls

from pipeline import cli
from pipeline.engine.runlog import RUN_LOG
from pipeline.sharing.planning import mark_remote
from pipeline.sharing.protocol import _digest, check_remote_manifest, redact, remote_manifest
from pipeline.sharing.remote import Remote, RemoteError
from pipeline.status import dag_status
from pipeline.storage.archive import ArchiveError, unpack
from pipeline.storage.store import Store

TESTS = Path(__file__).resolve().parent


# ---- a real S3 endpoint on the loopback interface -------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1:<free port>, started once, stopped at the end."""
    server_mod = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                pytest.fail(f"moto server did not start on 127.0.0.1:{port}")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _s3_env(monkeypatch, endpoint: str) -> None:
    for var, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                       "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}.items():
        monkeypatch.setenv(var, value)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(params=["folder", "s3"])
def remote_url(request, tmp_path, monkeypatch):
    """A fresh remote: a local folder, or a new bucket on the moto endpoint. Sets $NEST_REMOTE."""
    import pipeline.sharing.remote as remote_mod

    monkeypatch.setattr(remote_mod, "_REMOTES", {})
    if request.param == "folder":
        url = str(tmp_path / "remote")
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        _s3_env(monkeypatch, endpoint)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        bucket = f"nest-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
        url = f"s3://{bucket}/cache"
    monkeypatch.setenv("NEST_REMOTE", url)
    monkeypatch.delenv("NEST_REMOTE_MODE", raising=False)
    return url


# ---- helpers ---------------------------------------------------------------------------------------------------------

def _build(*tasks) -> int:
    return cli.build(list(tasks), profile=None, command=["test"])


def _fresh():
    Register.clear_instance_cache()
    RUN_LOG.reset()


def _use_store(monkeypatch, root: Path) -> Store:
    monkeypatch.setenv("NEST_STORE", str(root))
    _fresh()
    return Store(root)


def _refs(store: Store) -> list[tuple[str, str]]:
    return sorted((r.stage, r.key) for r in store.folders() if store.complete(r.stage, r.key))


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (locks excluded): a pull that is refused must leave this unchanged."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".locks" not in p.parts}


def _remote(url: str) -> Remote:
    return Remote(url)


def _flip(remote: Remote, path: str, offset: int) -> None:
    data = bytearray(remote.fs.cat_file(path))
    data[offset % len(data)] ^= 0x01
    remote.fs.pipe_file(path, bytes(data))
    remote._fresh()


# ---- round trip ------------------------------------------------------------------------------------------------------

def test_push_then_pull_round_trip(fake_env, remote_url, monkeypatch, capsys):
    assert _build(FkAll()) == 0
    src = Store(fake_env.store_root)
    built = _refs(src)
    assert len(built) == 4
    assert cli.main(["push"]) == 0  # no argument: what the latest run reached
    out = capsys.readouterr().out
    assert "pushed 4 artifact(s)" in out
    remote = _remote(remote_url)
    assert remote.list() == built
    assert cli.main(["push", "--all"]) == 0
    again = capsys.readouterr().out
    assert "pushed 0 artifact(s)" in again and "4 already on" in again

    dst = _use_store(monkeypatch, fake_env.root / "elsewhere" / "store")
    assert cli.main(["pull", "--all"]) == 0
    assert "pulled 4 artifact(s)" in capsys.readouterr().out
    assert _refs(dst) == built
    for stage, key in built:
        assert dst.verify(stage, key) == []
        assert dst.manifest(stage, key) == src.manifest(stage, key)
        assert (dst.path(stage, key) / "out.txt").read_bytes() == (src.path(stage, key) / "out.txt").read_bytes()
    assert not list(dst.root.glob("*/.tmp-*"))


def test_push_and_pull_by_stage_and_key_prefix(fake_env, remote_url, monkeypatch, capsys):
    assert _build(FkAll()) == 0
    src = Store(fake_env.store_root)
    leaf_key = FkLeaf().key
    assert cli.main(["push", "FkSide", leaf_key[:10]]) == 0
    assert sorted(s for s, _ in _remote(remote_url).list()) == ["FkLeaf", "FkSide"]
    assert cli.main(["push", "NoSuchStage"]) == 2
    assert "neither a stage" in capsys.readouterr().err
    dst = _use_store(monkeypatch, fake_env.root / "b")
    assert cli.main(["pull", leaf_key[:8]]) == 0
    assert _refs(dst) == [("FkLeaf", leaf_key)]
    assert dst.manifest("FkLeaf", leaf_key) == src.manifest("FkLeaf", leaf_key)


# ---- the manifest is the publication step ---------------------------------------------------------------------------

def test_manifest_is_uploaded_last_and_an_archive_without_it_is_invisible(fake_env, remote_url, monkeypatch):
    assert _build(FkSource()) == 0
    store = Store(fake_env.store_root)
    key = FkSource().key
    remote = _remote(remote_url)
    order = []
    real_archive, real_manifest = Remote._put_archive, Remote._put_manifest

    def archive_first(self, stage, k, write):
        order.append(f"{k}.tar.zst")
        return real_archive(self, stage, k, write)

    def manifest_fails(self, stage, k, body):
        order.append(f"{k}.manifest.json")
        raise ConnectionError("link lost before the manifest")

    monkeypatch.setattr(Remote, "_put_archive", archive_first)
    monkeypatch.setattr(Remote, "_put_manifest", manifest_fails)
    with pytest.raises(RemoteError, match="link lost"):
        remote.push(store, "FkSource", key)
    assert order == [f"{key}.tar.zst", f"{key}.manifest.json"]
    monkeypatch.setattr(Remote, "_put_manifest", real_manifest)
    remote._fresh()
    assert remote.fs.exists(remote.archive_path("FkSource", key))  # the whole archive is there ...
    assert not remote.has("FkSource", key) and remote.list() == []  # ... but nobody sees it

    dst = _use_store(monkeypatch, fake_env.root / "b")
    with pytest.raises(RemoteError, match="not on the remote"):
        remote.pull(dst, "FkSource", key)
    assert _build(FkSource()) == 0  # read-through finds nothing: it builds
    assert calls(fake_env.log) == ["src", "src"]
    # a later push completes the publication
    assert remote.push(store, "FkSource", key) is not None and remote.has("FkSource", key)


# ---- integrity: flipped bytes, wrong files, unsafe members ---------------------------------------------------------

@pytest.mark.parametrize("where", ["archive-start", "archive-middle", "archive-end", "manifest-digest",
                                   "manifest-date"])
def test_a_flipped_byte_is_refused_and_nothing_local_changes(fake_env, remote_url, monkeypatch, where):
    assert _build(FkMid()) == 0
    store = Store(fake_env.store_root)
    key = FkMid().key
    remote = _remote(remote_url)
    remote.push(store, "FkMid", key)
    if where.startswith("archive"):
        path = remote.archive_path("FkMid", key)
        size = remote.fs.size(path)
        offset = {"archive-start": 5, "archive-middle": size // 2, "archive-end": size - 1}[where]
    else:
        path = remote.manifest_path("FkMid", key)
        text = remote.fs.cat_file(path).decode()
        anchor = '"sha256": "' if where == "manifest-digest" else '"created_at": "'
        offset = text.index(anchor) + len(anchor) + 3
    _flip(remote, path, offset)

    dst_root = fake_env.root / "b"
    dst = _use_store(monkeypatch, dst_root)
    dst_root.mkdir(parents=True)
    before = _snapshot(dst_root)
    with pytest.raises(RemoteError) as err:
        remote.pull(dst, "FkMid", key)
    line = str(err.value)
    assert "\n" not in line and line.startswith("pull refused: FkMid/" + key[:12])
    assert _snapshot(dst_root) == before
    assert not dst.complete("FkMid", key) and not list(dst_root.glob("*/.tmp-*"))
    # the CLI says the same in one line, exit 1
    assert cli.main(["pull", "--all"]) == 1
    # a run does not take it: it builds instead
    assert _build(FkMid()) == 0 and dst.verify("FkMid", key) == []


def test_a_corrupt_local_file_is_refused_by_push_verify_and_by_every_pull(fake_env, remote_url, monkeypatch, capsys):
    assert _build(FkMid()) == 0
    store = Store(fake_env.store_root)
    key = FkMid().key
    out = store.path("FkMid", key) / "out.txt"
    out.write_bytes(bytes([out.read_bytes()[0] ^ 1]) + out.read_bytes()[1:])  # same size, one bit flipped
    assert cli.main(["push", "--verify", "FkMid"]) == 1
    assert "out.txt differs from its manifest" in capsys.readouterr().err
    remote = _remote(remote_url)
    assert remote.list() == []
    assert cli.main(["push", "FkMid"]) == 0  # without --verify it is sent ...
    dst = _use_store(monkeypatch, fake_env.root / "b")
    with pytest.raises(RemoteError, match=r"FkMid/\w{12}: out.txt: sha256 differs from the manifest"):
        remote.pull(dst, "FkMid", key)  # ... and no pull takes it
    assert not dst.complete("FkMid", key)


def _repush_with(remote: Remote, stage: str, key: str, archive: bytes, doc: dict) -> None:
    """Replace an artifact on the remote with ``archive`` and a self-consistent manifest ``doc`` (a well-formed lie)."""
    import hashlib

    doc["remote"]["archive"] = {"size": len(archive), "sha256": hashlib.sha256(archive).hexdigest()}
    doc["manifest_sha256"] = _digest(doc)
    remote.fs.pipe_file(remote.archive_path(stage, key), archive)
    remote.fs.pipe_file(remote.manifest_path(stage, key), json.dumps(doc).encode())
    remote._fresh()


def test_a_file_that_differs_from_the_manifest_is_named(fake_env, remote_url, monkeypatch):
    assert _build(FkMid()) == 0
    store = Store(fake_env.store_root)
    key = FkMid().key
    remote = _remote(remote_url)
    remote.push(store, "FkMid", key)
    doc = json.loads(remote.fs.cat_file(remote.manifest_path("FkMid", key)))
    doc["files"]["sub/n.txt"]["sha256"] = "0" * 64
    _repush_with(remote, "FkMid", key, remote.fs.cat_file(remote.archive_path("FkMid", key)), doc)
    dst = _use_store(monkeypatch, fake_env.root / "b")
    with pytest.raises(RemoteError, match=r"FkMid/\w{12}: sub/n.txt: sha256 differs from the manifest"):
        remote.pull(dst, "FkMid", key)
    assert not (fake_env.root / "b" / "FkMid" / key).exists()


def _tar_zst(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return zstandard.ZstdCompressor().compress(raw.getvalue())


def _member(name: str, kind=tarfile.REGTYPE, data: bytes = b"x", link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


UNSAFE = {
    "dotdot": (_member("../evil.txt"), "'..'"),
    "absolute": (_member("/tmp/evil.txt"), "absolute"),
    "nested-dotdot": (_member("sub/../../evil.txt"), "'..'"),
    "symlink": (_member("out.txt", tarfile.SYMTYPE, link="/etc/passwd"), "a link"),
    "hardlink": (_member("out.txt", tarfile.LNKTYPE, link="sub/n.txt"), "a link"),
    "device": (_member("out.txt", tarfile.CHRTYPE), "device"),
    "fifo": (_member("out.txt", tarfile.FIFOTYPE), "device"),
    "not-in-manifest": (_member("extra.txt"), "not in the manifest"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_members_are_refused_in_one_line(tmp_path, case):
    member, words = UNSAFE[case]
    blob = _tar_zst([member])
    dest = tmp_path / "dest" / "artifact"
    dest.mkdir(parents=True)
    files = {"out.txt": {"size": 1, "sha256": "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"}}
    with pytest.raises(ArchiveError) as err:
        unpack(io.BytesIO(blob), dest, files, None, label="FkMid/abc")
    assert "\n" not in str(err.value) and words in str(err.value) and str(err.value).startswith("FkMid/abc: ")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["artifact", "dest"]


def test_a_pull_of_an_archive_with_a_symlink_is_refused(fake_env, remote_url, monkeypatch):
    assert _build(FkSource()) == 0
    store = Store(fake_env.store_root)
    key = FkSource().key
    remote = _remote(remote_url)
    remote.push(store, "FkSource", key)
    doc = json.loads(remote.fs.cat_file(remote.manifest_path("FkSource", key)))
    evil = _tar_zst([_member("out.txt", tarfile.SYMTYPE, link="/etc/passwd")])
    _repush_with(remote, "FkSource", key, evil, doc)
    dst_root = fake_env.root / "b"
    dst = _use_store(monkeypatch, dst_root)
    with pytest.raises(RemoteError, match="refused member 'out.txt': a link"):
        remote.pull(dst, "FkSource", key)
    assert not dst.complete("FkSource", key) and not list(dst_root.rglob("out.txt"))


def test_manifest_checks_refuse_unsafe_names_and_bad_entries():
    good = remote_manifest({"stage": "S", "key": "a" * 64, "files": {"x.txt": {"size": 1, "sha256": "b" * 64}}},
                           {"size": 10, "sha256": "c" * 64})
    check_remote_manifest(good, "S", "a" * 64)
    for files in ({"../x": {"size": 1, "sha256": "b" * 64}}, {"/x": {"size": 1, "sha256": "b" * 64}},
                  {"x": {"size": -1, "sha256": "b" * 64}}, {"x": {"size": 1, "sha256": "nothex"}}):
        bad = remote_manifest({"stage": "S", "key": "a" * 64, "files": files}, {"size": 10, "sha256": "c" * 64})
        with pytest.raises(RemoteError):
            check_remote_manifest(bad, "S", "a" * 64)
    with pytest.raises(RemoteError, match="manifest names"):
        check_remote_manifest(good, "S", "d" * 64)


# ---- concurrency -----------------------------------------------------------------------------------------------------

PUSHER = """
import os, sys, time
from pathlib import Path
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.005)
from pipeline import cli
sys.exit(cli.main(["push", "--all"]))
"""


def test_two_machines_pushing_the_same_key_at_once_both_succeed(fake_env, remote_url, monkeypatch):
    """Two processes push the same artifact (8 MiB, so that the uploads overlap): both exit 0, and the remote holds
    one whole artifact that pulls and verifies; a local-folder remote keeps no temp files."""
    store = Store(fake_env.store_root)
    key = "e" * 64
    store.publish("Big", key, lambda out: (out / "big.bin").write_bytes(os.urandom(8 << 20)), version="1",
                  params={}, inputs={})
    go = fake_env.root / "go"
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    procs = [subprocess.Popen([sys.executable, "-c", PUSHER, str(go)], cwd=PROJECT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(1.5)  # both imported and waiting
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    remote = _remote(remote_url)
    assert remote.list() == [("Big", key)]
    if not remote_url.startswith("s3://"):
        assert sorted(p.name for p in (Path(remote_url) / "Big").iterdir()) == [f"{key}.manifest.json",
                                                                                f"{key}.tar.zst"]
    dst = _use_store(monkeypatch, fake_env.root / "b")
    remote.pull(dst, "Big", key)
    assert dst.verify("Big", key) == [] and dst.manifest("Big", key) == store.manifest("Big", key)


# ---- runs: read-through, push mode, status ---------------------------------------------------------------------------

def test_read_through_pulls_a_missing_stage_instead_of_building_it(fake_env, remote_url, monkeypatch, capsys):
    assert _build(FkAll()) == 0
    assert cli.main(["push", "FkLeaf", "FkSide"]) == 0  # only the two targets go to the remote
    log_before = calls(fake_env.log)
    dst = _use_store(monkeypatch, fake_env.root / "b")
    capsys.readouterr()
    assert _build(FkAll()) == 0
    assert calls(fake_env.log) == log_before  # nothing built: FkSource and FkMid are not even needed
    run = json.loads((dst.runs_dir / "latest.json").read_text())
    status = {r["stage"]: r["status"] for r in run["reached"]}
    assert status["FkLeaf"] == status["FkSide"] == "pulled"
    assert "pulling from" in capsys.readouterr().err
    assert _refs(dst) == sorted([("FkLeaf", FkLeaf().key), ("FkSide", FkSide().key)])


def test_remote_mode_off_builds_and_push_mode_shares_what_it_builds(fake_env, remote_url, monkeypatch):
    assert _build(FkAll()) == 0
    assert cli.main(["push", "--all"]) == 0
    n = len(calls(fake_env.log))
    monkeypatch.setenv("NEST_REMOTE_MODE", "off")
    _use_store(monkeypatch, fake_env.root / "b")
    assert _build(FkSource()) == 0 and len(calls(fake_env.log)) == n + 1  # built, not pulled

    other = Remote(str(fake_env.root / "remote2"))
    monkeypatch.setenv("NEST_REMOTE", other.url)
    monkeypatch.setenv("NEST_REMOTE_MODE", "push")
    _use_store(monkeypatch, fake_env.root / "c")
    assert _build(FkMid()) == 0
    assert other.list() == sorted([("FkMid", FkMid().key), ("FkSource", FkSource().key)])

    monkeypatch.setenv("NEST_REMOTE_MODE", "sideways")
    _fresh()
    from pipeline.sharing.remote import remote_mode

    with pytest.raises(RemoteError, match="remote_mode = 'sideways': expected one of pull, push, both, off"):
        remote_mode()


def test_status_marks_cached_remote_to_build_and_not_needed(fake_env, remote_url, monkeypatch):
    assert _build(FkAll()) == 0
    assert cli.main(["push", "FkMid"]) == 0
    dst = _use_store(monkeypatch, fake_env.root / "b")
    assert _build(FkSource()) == 0  # FkSource cached locally (built here)
    _fresh()
    rows = dag_status([FkAll()], dst)
    mark_remote(rows, _remote(remote_url))
    state = {s.task.stage: s.state for s in rows}
    assert state == {"FkSource": "cached", "FkMid": "remote", "FkLeaf": "new", "FkSide": "new"}

    # with FkLeaf on the remote too, FkMid (only needed to build FkLeaf) is not needed at all
    monkeypatch.setenv("NEST_STORE", str(fake_env.store_root))
    assert cli.main(["push", "FkLeaf"]) == 0
    dst2 = _use_store(monkeypatch, fake_env.root / "c")
    rows = dag_status([FkAll()], dst2)
    mark_remote(rows, _remote(remote_url))
    state = {s.task.stage: s.state for s in rows}
    assert state == {"FkSource": "new", "FkMid": "not needed", "FkLeaf": "remote", "FkSide": "new"}


def test_location_independence_a_clone_elsewhere_builds_nothing(tmp_path, remote_url, monkeypatch):
    """Build in clone A, push; pull into clone B at another path; a run there builds zero stages and gives the same keys
    and the same bytes."""
    from pipeline_fakes import FAKE_MODULE, write_fake_stage

    def clone(name: str) -> Path:
        root = tmp_path / name / "project"
        write_fake_stage(root / "mods")
        monkeypatch.setenv("NEST_STORE", str(root / "store"))
        monkeypatch.setenv("NEST_FAKE_LOG", str(root / "calls.log"))
        monkeypatch.syspath_prepend(str(root / "mods"))
        sys.modules.pop(FAKE_MODULE, None)
        _fresh()
        return root

    a = clone("a")
    assert _build(FkAll()) == 0
    keys_a = {r["stage"]: r["key"] for r in json.loads((a / "store/runs/latest.json").read_text())["reached"]}
    leaf_a = (Store(a / "store").path("FkLeaf", keys_a["FkLeaf"]) / "out.txt").read_bytes()
    assert cli.main(["push"]) == 0

    b = clone("b")
    assert cli.main(["pull", "--all"]) == 0
    assert _build(FkAll()) == 0
    assert calls(b / "calls.log") == []  # zero stages built
    run_b = json.loads((b / "store/runs/latest.json").read_text())
    assert {r["stage"]: r["key"] for r in run_b["reached"]} == keys_a
    assert {r["status"] for r in run_b["reached"]} == {"cached"}
    assert (Store(b / "store").path("FkLeaf", keys_a["FkLeaf"]) / "out.txt").read_bytes() == leaf_a
    sys.modules.pop(FAKE_MODULE, None)


# ---- configuration and messages --------------------------------------------------------------------------------------

def test_credentials_never_appear_in_what_is_shown():
    assert redact("s3://AKIAXYZ:s3cr3t@bucket/prefix") == "s3://***@bucket/prefix"
    assert redact("https://u:p@host/x?X-Amz-Signature=abc") == "https://***@host/x?…"
    assert redact("/data/remote") == "/data/remote"
    r = Remote("file:///tmp/nest-remote-test")
    url = "s3://AKIAXYZ:s3cr3t@bucket/prefix"
    r.url, r.shown = url, redact(url)
    msg = r._clean(ValueError(f"cannot reach {url} as AKIAXYZ:s3cr3t"))
    assert "s3cr3t" not in msg and "AKIAXYZ" not in msg


def test_a_missing_backend_library_is_one_line(monkeypatch):
    import fsspec

    if "gs" in fsspec.registry:
        pytest.skip("gcsfs is already imported here")
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # import fails, as when it is not installed
    with pytest.raises(RemoteError) as err:
        Remote("gs://bucket/prefix")
    assert "\n" not in str(err.value) and "gcsfs" in str(err.value)


def test_push_without_a_remote_says_how_to_set_one(fake_env, monkeypatch, capsys):
    monkeypatch.delenv("NEST_REMOTE", raising=False)
    assert cli.main(["push", "--all"]) == 2
    assert "no remote configured" in capsys.readouterr().err
