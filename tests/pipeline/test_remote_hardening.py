"""Remote stores under crashes, races and hostile names: publication on a folder remote and S3, damaged remote copies,
names from outside, a read-only store and a missing remote folder, the damaged-pull path.

Folder remotes use tmp folders; S3 runs against moto's server on 127.0.0.1 through s3fs (the fixtures of
tests/pipeline/test_remote.py).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.sharing.protocol import check_remote_manifest, remote_manifest
from pipeline.sharing.remote import Remote, RemoteError
from pipeline.storage.store import Store
from pipeline_conftest_helpers import PROJECT, fake_env  # noqa: F401  (fixture)
from pipeline_fakes import FkMid, FkSource, calls
from test_remote import (_build, _flip, _refs, _remote, _s3_env, _use_store, remote_url,  # noqa: F401  (fixtures)
                         s3_endpoint)

BIG_KEY = "e" * 64


def _big(store: Store, mib: int = 6) -> None:
    store.publish("Big", BIG_KEY, lambda out: (out / "big.bin").write_bytes(os.urandom(mib << 20)), version="1",
                  params={}, inputs={})


def _said(err: str) -> list[str]:
    """The lines of stderr that say something (progress bars left out)."""
    return [line for line in err.splitlines() if line.startswith("nest:")]


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# ---- item 1: publication on a folder remote ---------------------------------------------------------------------------

class _Boom(Exception):
    pass


def test_an_interrupted_folder_push_stages_nothing_in_tmpdir_and_never_shows_a_partial_archive(fake_env, tmp_path,
                                                                                             monkeypatch):
    """while the archive is written, nothing is staged in $TMPDIR and the final name does not exist; a push
    interrupted mid-copy leaves no temp file anywhere, no archive and no manifest."""
    import tempfile

    import pipeline.storage.archive as archive_mod

    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)
    store = Store(fake_env.store_root)
    _big(store)
    remote = Remote(str(tmp_path / "remote"))
    final = Path(remote.archive_path("Big", BIG_KEY))
    seen = []
    real_write = archive_mod._HashingWriter.write

    def write(self, b):
        n = real_write(self, b)
        seen.append((list(tmpdir.iterdir()), final.exists()))
        if self.size > (1 << 20):
            raise _Boom("interrupted mid-copy")
        return n

    monkeypatch.setattr(archive_mod._HashingWriter, "write", write)
    with pytest.raises(RemoteError, match="interrupted mid-copy"):
        remote.push(store, "Big", BIG_KEY)
    assert seen and all(staged == [] and not shown for staged, shown in seen)
    assert list(tmpdir.iterdir()) == []
    assert _files(tmp_path / "remote") == []  # the remote's own temp file is removed too
    assert not remote.has("Big", BIG_KEY)


KILLER = """
import os, signal, sys
from pathlib import Path
import pipeline.storage.archive as a
from pipeline.sharing.remote import Remote
from pipeline.storage.store import Store
real = a._HashingWriter.write
def write(self, b):
    n = real(self, b)
    if self.size > (1 << 20):
        os.kill(os.getpid(), signal.SIGKILL)
    return n
a._HashingWriter.write = write
Remote.check = lambda self, stage, key: (None, None)  # it looked before the other push published
Remote(sys.argv[1]).push(Store(sys.argv[2]), "Big", "e" * 64)
"""


def test_a_push_killed_mid_copy_after_another_published_leaves_the_published_artifact_whole(fake_env, tmp_path):
    """push B publishes; push A, which checked before B published, is killed
    mid-copy. The remote keeps B's whole artifact (it pulls and verifies), and A leaves nothing in $TMPDIR."""
    store = Store(fake_env.store_root)
    _big(store)
    remote_dir = tmp_path / "remote"
    remote = Remote(str(remote_dir))
    assert remote.push(store, "Big", BIG_KEY) is not None  # B
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "TMPDIR": str(tmpdir)}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(remote_dir), str(store.root)], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list(tmpdir.iterdir()) == []
    assert remote.has("Big", BIG_KEY)
    dst = Store(tmp_path / "dst")
    remote.pull(dst, "Big", BIG_KEY)
    assert dst.verify("Big", BIG_KEY) == []


def test_the_manifest_is_published_only_after_the_archive_is_read_back(fake_env, tmp_path, monkeypatch):
    """an archive replaced under the push's feet (another size) is caught by the read-back: no manifest."""
    store = Store(fake_env.store_root)
    _big(store, 2)
    remote = Remote(str(tmp_path / "remote"))
    real_back = Remote._read_back

    def truncate_first(self, path, archive):
        Path(path).write_bytes(b"")  # a concurrent writer left an empty file under the final name
        return real_back(self, path, archive)

    monkeypatch.setattr(Remote, "_read_back", truncate_first)
    with pytest.raises(RemoteError, match="read back"):
        remote.push(store, "Big", BIG_KEY)
    assert not Path(remote.manifest_path("Big", BIG_KEY)).exists()


def test_s3_push_failure_aborts_its_multipart_upload_and_clean_stale_aborts_old_ones(fake_env, s3_endpoint,
                                                                                    monkeypatch, capsys):
    """a failed push leaves no incomplete multipart upload; `nest push --clean-stale 0` aborts those a
    killed push left."""
    import uuid

    import s3fs

    import pipeline.storage.archive as archive_mod
    import pipeline.sharing.remote as remote_mod

    _s3_env(monkeypatch, s3_endpoint)
    monkeypatch.setattr(remote_mod, "_REMOTES", {})
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"nest-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(bucket)
    url = f"s3://{bucket}/cache"
    store = Store(fake_env.store_root)
    _big(store, 12)  # more than one 5 MiB part: a real multipart upload
    remote = Remote(url)
    real_write = archive_mod._HashingWriter.write

    def write(self, b):
        n = real_write(self, b)
        if self.size > (6 << 20):
            raise _Boom("interrupted")
        return n

    monkeypatch.setattr(archive_mod._HashingWriter, "write", write)
    with pytest.raises(RemoteError, match="interrupted"):
        remote.push(store, "Big", BIG_KEY)
    monkeypatch.setattr(archive_mod._HashingWriter, "write", real_write)

    def uploads():
        return fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])

    assert uploads() == []
    fs.call_s3("create_multipart_upload", Bucket=bucket, Key=f"cache/Big/{BIG_KEY}.tar.zst")  # a killed push's
    assert len(uploads()) == 1
    monkeypatch.setenv("NEST_REMOTE", url)
    capsys.readouterr()
    assert cli.main(["push", "--clean-stale", "0"]) == 0
    assert "removed 1 stale upload" in capsys.readouterr().out
    assert uploads() == []


def test_clean_stale_removes_old_temp_files_of_a_folder_remote(fake_env, tmp_path, monkeypatch, capsys):
    remote_dir = tmp_path / "remote"
    (remote_dir / "Big").mkdir(parents=True)
    old = remote_dir / "Big" / f".{BIG_KEY}.tar.zst.tmp-123-abcd"
    old.write_bytes(b"x" * 10)
    os.utime(old, (1, 1))
    fresh = remote_dir / "Big" / f".{BIG_KEY}.tar.zst.tmp-124-abce"
    fresh.write_bytes(b"y")
    assert cli.main(["push", "--remote", str(remote_dir), "--clean-stale", "1"]) == 0
    assert not old.exists() and fresh.exists()


# ---- item 2: damaged remote copies --------------------------------------------------------------------------------

def test_a_damaged_remote_copy_is_reported_by_verify_and_replaced_by_force(fake_env, remote_url, monkeypatch, capsys):
    """a flipped archive byte: plain push skips it (a cheap check cannot see it), `push --verify` reports it
    (exit 1), `push --force` replaces it; then every pull verifies."""
    assert _build(FkMid()) == 0
    store = Store(fake_env.store_root)
    key = FkMid().key
    remote = _remote(remote_url)
    remote.push(store, "FkMid", key)
    path = remote.archive_path("FkMid", key)
    _flip(remote, path, remote.fs.size(path) // 2)
    capsys.readouterr()
    assert cli.main(["push", "--verify", "FkMid"]) == 1
    err = capsys.readouterr().err
    assert "damaged on the remote" in err and "--force" in err and len(_said(err)) == 1
    assert cli.main(["push", "--verify", "--force", "FkMid"]) == 0
    assert "pushed 1 artifact(s)" in capsys.readouterr().out
    dst = _use_store(monkeypatch, fake_env.root / "b")
    remote.pull(dst, "FkMid", key)
    assert dst.verify("FkMid", key) == []
    # --force alone replaces even a whole copy
    capsys.readouterr()
    assert cli.main(["push", "--force", "FkMid"]) == 0
    assert "pushed 1 artifact(s)" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["archive-missing", "archive-truncated", "archive-empty", "manifest-cut"])
def test_a_missing_or_short_archive_does_not_count_and_a_plain_push_repairs_it(fake_env, remote_url, monkeypatch,
                                                                              capsys, damage):
    """complete() against the remote (has()) never counts an artifact whose archive is missing or of the wrong
    size, nor one with a cut manifest; a plain push replaces it."""
    assert _build(FkMid()) == 0
    store = Store(fake_env.store_root)
    key = FkMid().key
    remote = _remote(remote_url)
    remote.push(store, "FkMid", key)
    apath, mpath = remote.archive_path("FkMid", key), remote.manifest_path("FkMid", key)
    data = remote.fs.cat_file(apath)
    if damage == "archive-missing":
        remote.fs.rm(apath)
    elif damage == "archive-truncated":
        remote.fs.pipe_file(apath, data[: len(data) // 2])
    elif damage == "archive-empty":
        remote.fs.pipe_file(apath, b"")
    else:
        remote.fs.pipe_file(mpath, remote.fs.cat_file(mpath)[:100])
    remote._fresh()
    assert not remote.has("FkMid", key)
    capsys.readouterr()
    assert cli.main(["push", "FkMid"]) == 0
    captured = capsys.readouterr()
    assert "pushed 1 artifact(s)" in captured.out and "replaced a damaged remote copy" in captured.err
    assert remote.has("FkMid", key)
    dst = _use_store(monkeypatch, fake_env.root / "b")
    remote.pull(dst, "FkMid", key)
    assert dst.verify("FkMid", key) == []


def test_distributed_a_damaged_input_is_reported_in_one_line_and_built_here(fake_env, remote_url, monkeypatch,
                                                                           capsys):
    """in distributed mode an input whose remote archive is damaged (same size, a flipped byte) is
    refused in one line and built by this worker, which then replaces the damaged copy; no "neither in the local store
    nor on the remote"."""
    from pipeline.sharing.through import pull_inputs

    assert _build(FkMid()) == 0
    assert cli.main(["push", "--all"]) == 0
    remote = _remote(remote_url)
    src_key = FkSource().key
    path = remote.archive_path("FkSource", src_key)
    _flip(remote, path, remote.fs.size(path) // 2)
    _use_store(monkeypatch, fake_env.root / "w2")
    monkeypatch.setenv("NEST_DISTRIBUTED", "1")
    monkeypatch.setenv("NEST_REMOTE_MODE", "both")
    n = len(calls(fake_env.log))
    capsys.readouterr()
    pull_inputs(FkMid())
    err = capsys.readouterr().err
    assert "neither in the local store" not in err and "Traceback" not in err
    assert sum("not pulled (pull refused" in line for line in err.splitlines()) == 1
    assert calls(fake_env.log)[n:] == ["src"]  # FkSource built here
    assert remote.verify("FkSource", src_key) is None  # and the damaged copy replaced


# ---- item 6: names from outside -----------------------------------------------------------------------------------

def test_names_from_a_listing_or_a_manifest_are_checked_before_any_path(tmp_path):
    """stage names and keys are validated before a path is formed."""
    r = Remote(str(tmp_path / "remote"))
    for stage in ("..", ".", "runs", ".locks", "a/b", "", "1x", "x-y"):
        with pytest.raises(RemoteError, match="not a stage name"):
            r.archive_path(stage, "a" * 64)
    for key in ("A" * 64, "a" * 63, "../" + "a" * 61, "g" * 64):
        with pytest.raises(RemoteError, match="content key"):
            r.manifest_path("S", key)
    doc = remote_manifest({"stage": "..", "key": "a" * 64, "files": {}}, {"size": 1, "sha256": "c" * 64})
    with pytest.raises(RemoteError, match="not a stage name"):
        check_remote_manifest(doc, "..", "a" * 64)
    doc = remote_manifest({"stage": "S", "key": "a" * 64, "files": {},
                           "inputs": {"p": {"stage": "../../x", "key": "zz"}}}, {"size": 1, "sha256": "c" * 64})
    with pytest.raises(RemoteError, match="not a stage name"):
        check_remote_manifest(doc, "S", "a" * 64)
    doc = remote_manifest({"stage": "S", "key": "a" * 64, "files": {}}, {"size": "big", "sha256": "c" * 64})
    with pytest.raises(RemoteError, match="archive size"):
        check_remote_manifest(doc, "S", "a" * 64)


def _crafted(key: str) -> tuple[bytes, bytes]:
    import hashlib
    import io
    import tarfile

    import zstandard

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("x.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    blob = zstandard.ZstdCompressor(write_checksum=True).compress(raw.getvalue())
    doc = remote_manifest({"format": 1, "stage": "..", "key": key,
                           "files": {"x.txt": {"size": 2, "sha256": hashlib.sha256(b"hi").hexdigest()}}},
                          {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
    return blob, json.dumps(doc).encode()


def test_pull_all_from_s3_with_a_dotdot_object_key_writes_nothing_outside_the_store(fake_env, s3_endpoint,
                                                                                   monkeypatch, capsys):
    """objects `prefix/../<64hex>.{tar.zst,manifest.json}` whose manifest says stage "..":
    `nest pull --all` writes nothing outside the store and says so in one line."""
    import uuid

    import boto3
    import s3fs

    import pipeline.sharing.remote as remote_mod

    _s3_env(monkeypatch, s3_endpoint)
    monkeypatch.setattr(remote_mod, "_REMOTES", {})
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"nest-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    key = "d" * 64
    blob, doc = _crafted(key)
    for name in ("evil/..", "evil/runs", "evil/.locks"):
        client.put_object(Bucket=bucket, Key=f"{name}/{key}.tar.zst", Body=blob)
        client.put_object(Bucket=bucket, Key=f"{name}/{key}.manifest.json", Body=doc)
    root = fake_env.root / "box"
    store_root = root / "store"
    _use_store(monkeypatch, store_root)
    before = sorted(p for p in fake_env.root.rglob("*"))
    capsys.readouterr()
    rc = cli.main(["pull", "--all", "--remote", f"s3://{bucket}/evil"])
    err = capsys.readouterr().err
    assert rc != 0 and "refused" in err and "not a stage name" in err
    assert "Traceback" not in err
    after = sorted(p for p in fake_env.root.rglob("*"))
    assert [p for p in after if p not in before and store_root not in p.parents and p != store_root] == []
    assert not list(store_root.rglob(key)) and not list(store_root.rglob("x.txt"))


def test_a_folder_remote_stage_named_runs_is_refused(fake_env, tmp_path, monkeypatch, capsys):
    key = "d" * 64
    blob, doc = _crafted(key)
    remote_dir = tmp_path / "remote" / "runs"
    remote_dir.mkdir(parents=True)
    (remote_dir / f"{key}.tar.zst").write_bytes(blob)
    (remote_dir / f"{key}.manifest.json").write_bytes(doc)
    store_root = _use_store(monkeypatch, tmp_path / "store").root
    assert cli.main(["pull", "--all", "--remote", str(tmp_path / "remote")]) == 1
    err = capsys.readouterr().err
    assert "'runs', not a stage name" in err and len(_said(err)) == 1
    assert not (store_root / "runs" / key).exists()


# ---- item 12: read-only store, missing remote folder --------------------------------------------------------------

def test_a_pull_into_a_read_only_store_is_one_line(fake_env, tmp_path, monkeypatch, capsys):
    """the store cannot be written (EROFS on its folders): `nest pull` says so in one line, exit 1."""
    assert _build(FkSource()) == 0
    remote_dir = tmp_path / "remote"
    assert cli.main(["push", "--all", "--remote", str(remote_dir)]) == 0
    ro = tmp_path / "ro-store"
    ro.mkdir()
    _use_store(monkeypatch, ro)
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if ro in self.parents or self == ro:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    capsys.readouterr()
    assert cli.main(["pull", "--all", "--remote", str(remote_dir)]) == 1
    err = capsys.readouterr().err
    assert "cannot write into the store" in err and "Read-only file system" in err
    assert "Traceback" not in err and len(_said(err)) == 1


def test_a_remote_folder_that_does_not_exist_is_an_error(fake_env, tmp_path, capsys):
    """`nest pull --remote /no/such/folder` is one line and a nonzero exit, not `pulled 0`."""
    missing = tmp_path / "no" / "such" / "remote"
    rc = cli.main(["pull", "--all", "--remote", str(missing)])
    captured = capsys.readouterr()
    assert rc == 2 and "pulled 0" not in captured.out
    assert "no such folder" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert not missing.exists()


# ---- throughput: the archive's digest ------------------------------------------------------------------------------

def test_a_pull_checks_head_size_zstd_checksum_and_files_and_hashes_the_archive_only_for_older_manifests(
        fake_env, tmp_path, monkeypatch):
    """A manifest that records the archive's first bytes is pulled without hashing the whole archive (zstd's checksum
    and each file's sha256 cover the content, the first bytes the frame header); an older one (sha256 only) is still
    checked by its sha256. A flipped frame-header byte is refused either way."""
    import hashlib

    import pipeline.storage.archive as archive_mod
    from pipeline.sharing.protocol import _digest

    assert _build(FkMid()) == 0
    store = Store(fake_env.store_root)
    key = FkMid().key
    remote = Remote(str(tmp_path / "remote"))
    remote.push(store, "FkMid", key)
    doc = json.loads(remote.fs.cat_file(remote.manifest_path("FkMid", key)))
    assert {"size", "head", "tail"} <= set(doc["remote"]["archive"]) and "sha256" not in doc["remote"]["archive"]
    hashed = []
    real_digest = archive_mod._HashingReader.digest
    monkeypatch.setattr(archive_mod._HashingReader, "digest", lambda self: hashed.append(1) or real_digest(self))
    remote.pull(Store(tmp_path / "a"), "FkMid", key)
    assert hashed == []
    old = json.loads(json.dumps(doc))  # an older push's manifest: the archive's sha256, no first or last bytes
    for part in ("head", "tail"):
        old["remote"]["archive"].pop(part)
    old["remote"]["archive"]["sha256"] = hashlib.sha256(remote.fs.cat_file(remote.archive_path("FkMid", key))).hexdigest()
    old["manifest_sha256"] = _digest(old)
    remote.fs.pipe_file(remote.manifest_path("FkMid", key), json.dumps(old).encode())
    remote._fresh()
    remote.pull(Store(tmp_path / "b"), "FkMid", key)
    assert hashed == [1]
    apath = remote.archive_path("FkMid", key)
    for manifest in (doc, old):
        remote.fs.pipe_file(remote.manifest_path("FkMid", key), json.dumps(manifest).encode())
        data = bytearray(remote.fs.cat_file(apath))
        data[5] ^= 1  # the zstd window descriptor: decodes to the same content
        remote.fs.pipe_file(apath, bytes(data))
        remote._fresh()
        with pytest.raises(RemoteError, match="first bytes|sha256 differs"):
            remote.pull(Store(tmp_path / f"c{len(manifest)}-{id(manifest)}"), "FkMid", key)
        data[5] ^= 1
        remote.fs.pipe_file(apath, bytes(data))
    assert hashlib.sha256(bytes(data)).hexdigest() == old["remote"]["archive"]["sha256"]  # restored byte for byte


TERMINATED = """
import os, signal, sys
import pipeline.storage.archive as a
real = a._HashingWriter.write
def write(self, b):
    n = real(self, b)
    if self.size > (6 << 20):
        os.kill(os.getpid(), signal.SIGTERM)
    return n
a._HashingWriter.write = write
from pipeline import cli
sys.exit(cli.main(["push", "--all"]))
"""


@pytest.mark.parametrize("kind", ["folder", "s3"])
def test_a_push_stopped_by_sigterm_aborts_its_upload_and_removes_its_temp(fake_env, tmp_path, s3_endpoint,
                                                                         monkeypatch, kind):
    """SIGTERM mid-upload (a batch scheduler's time limit): the push unwinds, aborting its S3 multipart upload or
    removing its temp file on a folder remote; nothing is published and the exit status is 143."""
    import uuid

    store = Store(fake_env.store_root)
    _big(store, 12)
    if kind == "s3":
        import s3fs

        _s3_env(monkeypatch, s3_endpoint)
        s3fs.S3FileSystem.clear_instance_cache()
        bucket = f"nest-{uuid.uuid4().hex[:12]}"
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(bucket)
        url = f"s3://{bucket}/cache"
    else:
        url = str(tmp_path / "remote")
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "NEST_REMOTE": url}
    proc = subprocess.run([sys.executable, "-c", TERMINATED], cwd=PROJECT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    if kind == "s3":
        assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
        assert fs.find(bucket) == []
    else:
        assert _files(tmp_path / "remote") == []


def test_read_through_into_a_read_only_store_is_one_line_not_a_traceback(fake_env, tmp_path, monkeypatch, capsys):
    """A run whose stage is on the remote but whose store cannot be written: the pull says why in one line (no
    `error in complete()` traceback), and the build that follows fails in one line too."""
    assert _build(FkSource()) == 0
    remote_dir = tmp_path / "remote"
    assert cli.main(["push", "--all", "--remote", str(remote_dir)]) == 0
    monkeypatch.setenv("NEST_REMOTE", str(remote_dir))
    ro = tmp_path / "ro-store"
    ro.mkdir()
    _use_store(monkeypatch, ro)
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if ro in self.parents or self == ro:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    capsys.readouterr()
    rc = _build(FkSource())
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err and "error in complete()" not in err
    assert "cannot write into the store" in err
