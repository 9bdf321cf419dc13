"""The download stage's address policy, through real img2dataset on a loopback server.

A URL list mixing good http rows with file://, ftp://, data:, gopher://, metadata-service and
link-local rows, and with redirects to refused targets: exactly the good rows land, every other
row is counted by reason, and the refused rows never reach img2dataset (its per-shard parquet
lists every row it was given). With private addresses refused, the same loopback corpus lands
nothing and the server is asked for nothing.

Every test runs in a network jail (tests/support/netjail.py), the img2dataset child included:
if the policy broke, a refused row fails loudly here instead of reaching 169.254.169.254.
"""
from __future__ import annotations

import base64
import io
import os
import socket

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from data_prep.download.address_policy import REASONS
from data_prep.download.guarded_http import AddressRefused, guarded_opener
from data_prep.download.stage import DownloadConfig, run
from data_prep.http_server import DemoHTTPServer, Route
from data_prep.shards import iter_shard, list_shards
from pipeline import store
from pipeline.context import StageContext, StageFailed
from pipeline.manifest import config_for_fingerprint, fingerprint
from tests.support import netjail
from tests.support.images import truth_rgb
from tests.support.specs import DEMO_SPEC, SMOKE_SPEC

N = 4  # good images on the server


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.roll(truth_rgb(), 9 * i, axis=1)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """N images on 127.0.0.1, and redirects to a metadata service, a local file, ftp and a good image."""
    root = tmp_path_factory.mktemp("site")
    for i in range(N):
        (root / f"{i}.jpg").write_bytes(_jpeg(i))
    secret = root / "secret.jpg"  # a file on the worker's disk that a file:// row or redirect would read
    secret.write_bytes(_jpeg(7))

    def redirect(location: str) -> Route:
        return Route(b"", "text/plain", headers={"Location": location}, status=302)

    routes = {"/to-metadata.jpg": redirect("http://169.254.169.254/latest/meta-data/iam/"),
              "/to-file.jpg": redirect(f"file://{secret}"),
              "/to-ftp.jpg": redirect("ftp://127.0.0.1:1/x.jpg"),
              "/to-good.jpg": redirect("/1.jpg")}
    with DemoHTTPServer(str(root), routes=routes) as srv:
        yield srv, root, secret


@pytest.fixture
def jailed(monkeypatch, tmp_path):
    """This process and every Python process it starts connect only to loopback and look up no names."""
    monkeypatch.setattr(socket, "socket", socket.socket)  # recorded, so the jail is undone after the test
    monkeypatch.setattr(socket, "getaddrinfo", socket.getaddrinfo)
    netjail.install()
    folder = netjail.jail_subprocesses(tmp_path / "jail")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p))


def _ctx(out_uri: str) -> StageContext:
    msgs: list[str] = []
    ctx = StageContext(run_uri=out_uri.rsplit("/", 1)[0], out_uri=out_uri, progress=msgs.append)
    ctx.messages = msgs  # type: ignore[attr-defined]
    return ctx


def _good_rows(srv) -> list[dict]:
    return [{"url": srv.url(f"{i}.jpg"), "caption": f"good {i}"} for i in range(N)]


# Rows refused before img2dataset: (url, caption, the refused_<reason> they count as).
def _refused_rows(secret) -> list[tuple[str, str, str]]:
    data_url = "data:image/jpeg;base64," + base64.b64encode(secret.read_bytes()).decode()
    return [(f"file://{secret}", "file", "scheme_file"),
            ("ftp://127.0.0.1:1/x.jpg", "ftp", "scheme_ftp"),
            (data_url, "data", "scheme_data"),
            ("gopher://127.0.0.1:1/_GET", "gopher", "scheme_gopher"),
            ("http://169.254.169.254/latest/meta-data/", "metadata", "metadata"),
            ("http://[fd00:ec2::254]/latest/", "metadata v6", "metadata"),
            ("http://169.254.7.7/a.jpg", "link-local", "link_local"),
            ("not a url at all", "junk", "invalid_url")]


def test_only_the_good_http_rows_land_and_every_other_row_is_counted_by_reason(site, jailed, tmp_path):
    srv, root, secret = site
    refused = _refused_rows(secret)
    redirects = ["to-metadata.jpg", "to-file.jpg", "to-ftp.jpg", "to-good.jpg"]
    rows = _good_rows(srv) + [{"url": u, "caption": c} for u, c, _ in refused]
    rows += [{"url": srv.url(r), "caption": f"redirect {r}"} for r in redirects]
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
    cfg = DownloadConfig(url_list=str(tmp_path / "urls.parquet"), allow_private_addresses=True, image_size=32,
                         thread_count=4, timeout=3, min_success_rate=0.0)
    out = str(tmp_path / "run" / "download")
    ctx = _ctx(out)
    asked_before = len(srv.requests)
    result = run(cfg, ctx)
    c = result.counts

    want = {f"refused_{r}": 0 for r in REASONS}
    for *_, reason in refused:
        want[f"refused_{reason}"] = want.get(f"refused_{reason}", 0) + 1
    assert {k: v for k, v in c.items() if k.startswith("refused_")} == want, c
    # Handed to img2dataset: the good rows and the redirects, nothing else (its parquet lists each row).
    handed = sorted(u for s in store.glob(store.join(result.outputs["shards"], "*.parquet"))
                    for u in pq.read_table(s, columns=["url"])["url"].to_pylist())
    assert handed == sorted([r["url"] for r in _good_rows(srv)] + [srv.url(r) for r in redirects])
    assert c["total"] == N + len(redirects) and c["rows_in_list"] == len(rows)
    # The three redirects to refused targets fail inside the fetch, counted apart.
    assert c["rejected_address_policy"] == 3 and c["successes"] == N + 1, c
    landed = sorted(s.caption for u in list_shards(result.outputs["shards"]) for s in iter_shard(u))
    assert landed == sorted([f"good {i}" for i in range(N)] + ["redirect to-good.jpg"])
    # The server saw exactly the good rows, the four redirects and the one redirect it allowed.
    asked = sorted(srv.requests[asked_before:])
    assert asked == sorted([f"GET /{i}.jpg" for i in range(N)] + [f"GET /{r}" for r in redirects] + ["GET /1.jpg"])
    assert any("refused by the address policy: " in m and "scheme_file 1" in m for m in ctx.messages), ctx.messages


def test_with_private_addresses_refused_the_loopback_corpus_lands_nothing_and_nothing_is_asked(site, jailed,
                                                                                                tmp_path):
    srv, _, _ = site
    rows = _good_rows(srv) + [{"url": srv.url("to-good.jpg"), "caption": "redirect"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
    cfg = DownloadConfig(url_list=str(tmp_path / "urls.parquet"), image_size=32, thread_count=4, timeout=3)
    assert cfg.allow_private_addresses is False  # the default
    out = str(tmp_path / "run" / "download")
    asked_before = len(srv.requests)
    with pytest.raises(StageFailed, match=rf"no rows to download .*refused_loopback {N + 1}.*"
                                          r"allow_private_addresses: true"):
        run(cfg, _ctx(out))
    assert srv.requests[asked_before:] == []
    assert not store.exists(store.join(out, "shards", "00000.tar"))


# ---------------------------------------------------------------- inside the fetch (redirects, connections)


def test_redirects_are_held_to_the_policy(site, jailed):
    srv, _, _ = site
    opener = guarded_opener(True)
    for path, reason in (("to-metadata.jpg", "metadata"), ("to-file.jpg", "scheme_file"), ("to-ftp.jpg", "scheme_ftp")):
        with pytest.raises(AddressRefused) as e:
            opener.open(srv.url(path), timeout=3)
        assert e.value.reason == reason and "redirect to" in str(e.value)
    with opener.open(srv.url("to-good.jpg"), timeout=3) as r:
        assert r.read() == _jpeg(1)


def test_connections_are_checked_on_the_worker_before_any_packet(site, jailed, monkeypatch):
    """A row that passed the list check can still name a refused address by the time it is fetched
    (another resolver, DNS rebinding): the connection resolves once and refuses before connecting.
    The jail would fail a connection attempt with its own message, so the policy's is proof enough."""
    srv, _, _ = site
    asked_before = len(srv.requests)
    with pytest.raises(AddressRefused, match="loopback"):
        guarded_opener(False).open(srv.url("0.jpg"), timeout=3)
    assert srv.requests[asked_before:] == []

    def rebinding(host, *args, **kwargs):
        assert host == "rebind.example", host
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with pytest.raises(AddressRefused, match=r"\(metadata\): rebind.example resolves to 169.254.169.254"):
        guarded_opener(True).open("http://rebind.example/latest/meta-data/", timeout=3)
    for url in ("file:///etc/passwd", "ftp://127.0.0.1:1/x"):
        with pytest.raises(AddressRefused, match="scheme_"):
            guarded_opener(True).open(url, timeout=3)


def test_the_jail_holds():
    """The jail itself: what the tests above rely on when the policy breaks."""
    real = socket.socket, socket.getaddrinfo
    try:
        netjail.install()
        with socket.socket() as s, pytest.raises(OSError, match=netjail.JAIL_MESSAGE):
            s.connect(("169.254.169.254", 80))
        with pytest.raises(OSError, match=netjail.JAIL_MESSAGE):
            socket.getaddrinfo("example.com", 80)
    finally:
        socket.socket, socket.getaddrinfo = real


# ---------------------------------------------------------------- the config field


def test_allow_private_addresses_is_identity_and_the_demo_allows_loopback(tmp_path):
    import yaml

    pq.write_table(pa.table({"url": ["http://127.0.0.1:1/a.jpg"], "caption": ["a"]}), tmp_path / "u.parquet")
    strict = DownloadConfig(url_list=str(tmp_path / "u.parquet"))
    lenient = DownloadConfig(url_list=str(tmp_path / "u.parquet"), allow_private_addresses=True)
    assert strict.allow_private_addresses is False and "allow_private_addresses" in config_for_fingerprint(strict)
    assert fingerprint("download", strict, {}) != fingerprint("download", lenient, {})  # changes which rows land
    assert DownloadConfig().allow_private_addresses is True  # url_list: demo, served on 127.0.0.1
    assert DownloadConfig(url_list="demo", allow_private_addresses=True).allow_private_addresses is True
    with pytest.raises(ValidationError, match="served on 127.0.0.1.*allow_private_addresses: false"):
        DownloadConfig(url_list="demo", allow_private_addresses=False)
    for spec in (SMOKE_SPEC, DEMO_SPEC):
        assert yaml.safe_load(spec.read_text())["download"]["allow_private_addresses"] is True, spec
