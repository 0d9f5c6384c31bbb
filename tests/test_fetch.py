"""`sharedris fetch` and the resumable downloader, against a local HTTP server with Range support."""

import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from sharedris.cli import main
from sharedris.data.check import check_root
from sharedris.data.synthetic import write_refer_format
from sharedris.download import DownloadError, Remote, download


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET of files under ``server.root``; honours ``Range: bytes=N-``; may drop the first transfer."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        path = server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").removesuffix("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if server.drop_after is not None:  # announce the whole file, send part of it, hang up
            self.wfile.write(data[start:start + server.drop_after])
            server.drop_after = None
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.root, httpd.requests, httpd.drop_after = root, [], None
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _served_file(server, name: str, size: int) -> bytes:
    data = bytes((i * 7 + i // 251) % 256 for i in range(size))
    (server.root / name).write_bytes(data)
    return data


def test_download_verifies_sha256(server, tmp_path):
    data = _served_file(server, "w.pth", 300_000)
    remote = Remote("w.pth", (f"{server.url}/w.pth",), size=len(data), sha256=hashlib.sha256(data).hexdigest())
    out = download(remote, tmp_path / "out" / "w.pth", echo=lambda s: None)
    assert out.read_bytes() == data
    assert not (tmp_path / "out" / "w.pth.part").exists()


def test_download_resumes_after_dropped_connection(server, tmp_path):
    data = _served_file(server, "big.bin", 2_500_000)
    server.drop_after = 1_000_000
    lines = []
    out = download(Remote("big.bin", (f"{server.url}/big.bin",)), tmp_path / "big.bin", retry_wait=0,
                   echo=lines.append)
    assert out.read_bytes() == data
    assert server.requests == [("/big.bin", None), ("/big.bin", "bytes=1000000-")]
    # No published hash: the digest seen is recorded next to the file and printed.
    digest = hashlib.sha256(data).hexdigest()
    assert (tmp_path / "big.bin.sha256").read_text() == f"{digest}  big.bin\n"
    assert any(digest in line for line in lines)


def test_wrong_checksum_is_refused(server, tmp_path):
    _served_file(server, "w.pth", 10_000)
    remote = Remote("w.pth", (f"{server.url}/w.pth",), sha256="0" * 64)
    with pytest.raises(DownloadError, match="refused and the partial file removed"):
        download(remote, tmp_path / "w.pth", echo=lambda s: None)
    assert list(tmp_path.iterdir()) == [server.root]


def test_unreachable_source_falls_back_to_the_next_url(server, tmp_path):
    data = _served_file(server, "a.zip", 5_000)
    remote = Remote("a.zip", (f"{server.url}/gone/a.zip", f"{server.url}/a.zip"))
    assert download(remote, tmp_path / "a.zip", echo=lambda s: None).read_bytes() == data
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(Remote("b.zip", (f"{server.url}/b.zip",)), tmp_path / "b.zip", echo=lambda s: None)


def _zip_tree(folder: Path, zip_path: Path, arc_top: str) -> None:
    """Zip ``folder`` with its files under ``arc_top/`` (the layout of the real archives)."""
    with zipfile.ZipFile(zip_path, "w") as zf:
        for f in sorted(folder.rglob("*")):
            zf.write(f, f"{arc_top}/{f.relative_to(folder)}")


def test_fetch_data_end_to_end(server, tmp_path, capsys):
    source = tmp_path / "source"
    write_refer_format(source, splits={"train": 2, "val": 1, "testA": 1, "testB": 1}, size=64)
    _zip_tree(source / "refcoco", server.root / "refcoco.zip", "refcoco")
    _zip_tree(source / "images" / "train2014", server.root / "train2014.zip", "train2014")
    root = tmp_path / "data"
    main(["fetch", "data", "refcoco", "--root", str(root), "--url", f"refcoco.zip={server.url}/refcoco.zip",
          "--url", f"train2014.zip={server.url}/train2014.zip"])
    out = capsys.readouterr().out
    assert f"ok: {root} is complete and readable" in out
    assert check_root(root, dataset="refcoco", progress=False, echo=lambda s: None) == []
    assert sorted(p.name for p in (root / "refcoco").iterdir()) == ["instances.json", "refs(unc).p"]
    assert not any((root / "downloads").iterdir())  # archives removed after unpacking
    assert not list(root.glob(".*")) and not list((root / "images").glob(".*"))  # no staging left


@pytest.mark.parametrize("argv, message", [
    (["fetch", "weights", "beit3_huge"], "unknown weights 'beit3_huge'"),
    (["fetch", "data", "refcoco", "--root", "{tmp}", "--url", "nope.zip=http://127.0.0.1:9/x"], "'nope.zip'"),
    (["fetch", "weights", "beit3_base", "--dir", "{tmp}/a_file/sub"], "cannot create folder"),
])
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exc:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sharedris fetch: error: ") and message in err
