from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from engine.edi.kernel.storage import CpdSettings, CpdVolume, MountedVolume, StorageError, clean_relative_path

VOLUME = "deepliif-data"
FILES_PREFIX = f"/zen-volumes/{VOLUME}/v1/volumes/files/"


@pytest.mark.parametrize("path, problem", [
    ("/etc/passwd", "not absolute"), ("a/../../b", "'..'"), ("..", "'..'"), ("", "non-empty"),
    ("a\\b", "backslash"), ("a\x00b", "NUL"), (42, "non-empty string"), ("C:/x", "not absolute")])
def test_unsafe_paths_are_refused(path: object, problem: str) -> None:
    with pytest.raises(StorageError, match=problem):
        clean_relative_path(path)


def test_mounted_volume_stays_inside_its_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "in").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("secret")
    (root / "in" / "out-link").symlink_to(tmp_path / "secret.txt")
    (root / "in" / "in-link").symlink_to(root / "in")
    volume = MountedVolume(root)
    with pytest.raises(StorageError, match="outside the volume"):
        volume.read_bytes("in/out-link", 100)
    volume.write_bytes("in/in-link/a.txt", b"ok")  # a link that stays inside is fine
    assert volume.read_bytes("in/a.txt", 100) == b"ok"
    with pytest.raises(StorageError, match="over the limit of 1"):
        volume.read_bytes("in/a.txt", 1)
    with pytest.raises(StorageError, match="not a directory"):
        MountedVolume(tmp_path / "absent")


def test_a_published_directory_appears_whole_and_replaces_the_old_one(tmp_path: Path) -> None:
    volume = MountedVolume(tmp_path)
    for generation in ("first", "second"):
        staging = volume.begin_dir("req/output_dir")
        assert Path(volume.resolve(staging)).name.startswith(".output_dir.partial-")
        volume.write_bytes(f"{staging}/a.txt", generation.encode())
        assert volume.list("req/output_dir") == ([] if generation == "first" else ["a.txt"])
        volume.publish_dir(staging, "req/output_dir")
        assert volume.read_bytes("req/output_dir/a.txt", 100) == generation.encode()
    assert volume.list("req") == ["output_dir"]  # no staging or old copies left
    volume.append_text("logs/x.log", "one\n")
    volume.append_text("logs/x.log", "two\n")
    assert volume.read_bytes("logs/x.log", 100) == b"one\ntwo\n"


class FakeCpd(BaseHTTPRequestHandler):
    """The Cloud Pak for Data endpoints the client uses, with knobs to fail on purpose."""

    protocol_version = "HTTP/1.1"
    files: dict[str, bytes] = {}
    tokens: set[str] = set()
    authorizations = 0
    fail_next: list[int] = []
    api_key = "secret-key"

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: bytes = b"{}") -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _authorized(self) -> bool:
        if self.fail_next:
            self._send(self.fail_next.pop(0))
            return False
        if self.headers.get("Authorization", "").removeprefix("Bearer ") not in self.tokens:
            self._send(401)
            return False
        return True

    def do_POST(self) -> None:  # noqa: N802
        record = json.loads(self._body())
        if self.path != "/icp4d-api/v1/authorize" or record != {"username": "admin", "api_key": self.api_key}:
            return self._send(401 if self.path == "/icp4d-api/v1/authorize" else 404)
        type(self).authorizations += 1
        token = f"token-{self.authorizations}"
        self.tokens.add(token)
        self._send(200, json.dumps({"token": token}).encode())

    def do_GET(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        path = urllib.parse.unquote(self.path.removeprefix(FILES_PREFIX))
        if path in self.files:
            return self._send(200, self.files[path])
        children = sorted({name[len(path) + 1:].split("/")[0] for name in self.files if name.startswith(path + "/")})
        if children:
            return self._send(200, json.dumps({"responseObject": {"directoryContents": children}}).encode())
        self._send(404)

    def do_PUT(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        body = self._body()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
        (part,) = [p for p in message.iter_parts() if p.get_param("name", header="content-disposition") == "upFile"]
        self.files[urllib.parse.unquote(self.path.removeprefix(FILES_PREFIX))] = part.get_payload(decode=True)
        self._send(200)


@pytest.fixture
def cpd():
    FakeCpd.files, FakeCpd.tokens, FakeCpd.authorizations, FakeCpd.fail_next = {}, set(), 0, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeCpd)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _volume(server, **changes) -> CpdVolume:
    settings = dict(url=f"http://127.0.0.1:{server.server_address[1]}", volume=VOLUME, username="admin",
                    api_key="secret-key", retries=4, backoff_s=0.01)
    settings.update(changes)
    return CpdVolume(CpdSettings(**settings))


def test_cpd_volume_uploads_downloads_lists_and_appends(cpd) -> None:
    volume = _volume(cpd)
    volume.write_bytes("edi/req 1/output_dir/a b.png", b"\x89PNG bytes")
    assert FakeCpd.files == {"edi/req 1/output_dir/a b.png": b"\x89PNG bytes"}  # path url-encoded, multipart
    assert volume.read_bytes("edi/req 1/output_dir/a b.png", 1000) == b"\x89PNG bytes"
    assert volume.exists("edi/req 1/output_dir/a b.png") and not volume.exists("edi/nothing")
    assert volume.list("edi/req 1/output_dir") == ["a b.png"] and volume.list("edi/none") == []
    volume.append_text("logs/pod.log", "one\n")
    volume.append_text("logs/pod.log", "two\n")
    assert FakeCpd.files["logs/pod.log"] == b"one\ntwo\n"
    assert FakeCpd.authorizations == 1  # one token for all of it
    with pytest.raises(StorageError, match="over the limit"):
        volume.read_bytes("logs/pod.log", 3)
    with pytest.raises(StorageError, match="not found"):
        volume.read_bytes("missing.png", 100)


def test_cpd_volume_retries_transient_failures_and_refreshes_an_expired_token(cpd) -> None:
    volume = _volume(cpd)
    volume.write_bytes("a.txt", b"1")
    FakeCpd.fail_next = [503, 502, 429]  # three transient failures, then success
    assert volume.read_bytes("a.txt", 10) == b"1"
    FakeCpd.tokens.clear()  # the server forgets the token: 401, one re-authorization, success
    assert volume.read_bytes("a.txt", 10) == b"1" and FakeCpd.authorizations == 2
    FakeCpd.fail_next = [500] * 4
    with pytest.raises(StorageError, match="failed after 4 attempt"):
        volume.read_bytes("a.txt", 10)
    FakeCpd.fail_next = [403]
    with pytest.raises(StorageError, match="failed after 1 attempt.*HTTP 403"):
        volume.read_bytes("a.txt", 10)


def test_cpd_volume_with_bad_credentials_or_settings_says_so(cpd) -> None:
    with pytest.raises(StorageError, match="HTTP 401"):
        _volume(cpd, api_key="wrong").read_bytes("a.txt", 10)
    with pytest.raises(StorageError, match="setting api_key is empty"):
        _volume(cpd, api_key="")
    unreachable = _volume(cpd, url="http://127.0.0.1:9", retries=2)
    with pytest.raises(StorageError, match="failed after 2 attempt"):
        unreachable.read_bytes("a.txt", 10)


def test_an_exclusive_create_has_one_winner_and_is_never_read_half_written(tmp_path: Path) -> None:
    """Regression: a losing kernel read the winner's claim while it was still empty and refused a retry."""
    import json
    import threading
    volume = MountedVolume(tmp_path)
    for trial in range(100):
        outcomes: list[tuple[bool, int]] = []
        payloads = [json.dumps({"writer": i, "pad": "x" * 5000}).encode() for i in range(4)]

        def create(i: int) -> None:
            won = volume.create_exclusive(f"r{trial}/claim.json", payloads[i])
            outcomes.append((won, json.loads(volume.read_bytes(f"r{trial}/claim.json", 1 << 20))["writer"]))

        threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(won for won, _ in outcomes) == 1 and len({writer for _, writer in outcomes}) == 1
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_model_goes_up_to_a_cpd_volume_and_a_kernel_fetches_it_from_there(cpd, edi_model: Path,
                                                                           tmp_path: Path) -> None:
    from deepliif.model_dir import load_model_dir
    from engine.edi.kernel.model_store import MANIFEST, ModelFetcher, ModelSource, upload_model
    volume = _volume(cpd)
    upload_model(edi_model, volume, "models/deepliif")
    assert f"models/deepliif/{MANIFEST}" in FakeCpd.files
    fetched = ModelFetcher(ModelSource.parse("volume:models/deepliif"), tmp_path / "model", volume).fetch()
    assert load_model_dir(fetched).weights_sha256() == load_model_dir(edi_model).weights_sha256()
