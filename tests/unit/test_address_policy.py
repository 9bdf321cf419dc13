"""The download stage's address policy (data_prep/download/address_policy.py), on literal URLs and
addresses. Nothing here sends a packet: names are resolved by an injected table that fails the
test if asked for a name it does not hold, and no test resolves a real name.
"""
from __future__ import annotations

import random

import pyarrow as pa
import pytest

from data_prep.download.address_policy import (REASONS, HostChecker, address_reason, host_reason, url_reason,
                                               url_target)
from data_prep.download.url_list import apply_address_policy

# What the injected resolver answers; a name not here is an error (a lookup the test did not expect).
DNS = {
    "images.example": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
    "cdn.example": ["151.101.1.1"],
    "split.example": ["93.184.216.34", "10.0.0.7"],     # one public, one private answer
    "rebind.example": ["169.254.169.254"],               # a public-looking name for the metadata service
    "v6local.example": ["fe80::1%2"],
    "intranet.example": ["192.168.1.20"],
    "home.example": ["127.0.0.1"],
    "mapped.example": ["::ffff:10.1.2.3"],
}
NXDOMAIN = {"gone.example"}


class FakeDNS:
    def __init__(self):
        self.asked: list[str] = []

    def __call__(self, host: str) -> list[str]:
        self.asked.append(host)
        host = host.lower()  # as DNS compares names
        if host in NXDOMAIN:
            raise OSError(f"[Errno -2] Name or service not known: {host}")
        assert host in DNS, f"unexpected lookup of {host!r}: a test must never resolve a real name"
        return DNS[host]


# url -> (reason with allow_private_addresses false, reason with it true)
CASES = {
    "http://93.184.216.34/a.jpg": (None, None),
    "https://images.example/cat.jpg?w=256": (None, None),
    "HTTPS://CDN.example:8443/x.png": (None, None),
    # schemes: refused whatever the address
    "file:///etc/passwd": ("scheme_file", "scheme_file"),
    "FILE:///home/user/.aws/credentials": ("scheme_file", "scheme_file"),
    " <URL:file:///etc/shadow> ": ("scheme_file", "scheme_file"),  # urllib unwraps this form
    "ftp://127.0.0.1/pub/a.jpg": ("scheme_ftp", "scheme_ftp"),
    "data:image/png;base64,iVBORw0KGgo=": ("scheme_data", "scheme_data"),
    "gopher://127.0.0.1:6379/_INFO": ("scheme_gopher", "scheme_gopher"),
    "javascript:alert(1)": ("scheme_javascript", "scheme_javascript"),
    "x-custom://host/a": ("scheme_other", "scheme_other"),
    "www.example.com/a.jpg": ("invalid_url", "invalid_url"),
    "http:///a.jpg": ("invalid_url", "invalid_url"),
    "http://images.example:http/a.jpg": ("invalid_url", "invalid_url"),
    # metadata and link-local: refused even when private addresses are allowed
    "http://169.254.169.254/latest/meta-data/iam/": ("metadata", "metadata"),
    "http://[fd00:ec2::254]/latest/": ("metadata", "metadata"),
    "http://metadata.google.internal/computeMetadata/v1/": ("metadata", "metadata"),
    "http://Metadata.Google.Internal./x": ("metadata", "metadata"),
    "http://100.100.100.200/latest/meta-data/": ("metadata", "metadata"),
    "http://169.254.10.20/x": ("link_local", "link_local"),
    "http://[fe80::1%25eth0]:8080/x": ("link_local", "link_local"),
    "http://[::ffff:169.254.169.254]/": ("metadata", "metadata"),   # IPv4-mapped
    "http://[64:ff9b::a9fe:a9fe]/": ("metadata", "metadata"),         # NAT64 of 169.254.169.254
    "http://rebind.example/latest/": ("metadata", "metadata"),
    "http://v6local.example/": ("link_local", "link_local"),
    # loopback, private, reserved: refused unless allowed
    "http://127.0.0.1:8000/a.jpg": ("loopback", None),
    "http://127.1/a.jpg": ("loopback", None),            # what getaddrinfo reads as 127.0.0.1
    "http://0x7f000001/a.jpg": ("loopback", None),
    "http://2130706433/a.jpg": ("loopback", None),
    "http://127.0.0.%31/a.jpg": ("loopback", None),      # urllib percent-decodes the host
    "http://[::1]/a.jpg": ("loopback", None),
    "http://home.example/a.jpg": ("loopback", None),
    "http://10.1.2.3/a.jpg": ("private", None),
    "http://172.16.0.1/a.jpg": ("private", None),
    "http://172.31.255.255/a.jpg": ("private", None),
    "http://192.168.1.1/a.jpg": ("private", None),
    "http://100.64.0.1/a.jpg": ("private", None),         # carrier-grade NAT
    "http://[fc00::1]/a.jpg": ("private", None),
    "http://[fd12:3456::1]/a.jpg": ("private", None),
    "http://intranet.example/a.jpg": ("private", None),
    "http://split.example/a.jpg": ("private", None),      # any refused answer refuses the name
    "http://mapped.example/a.jpg": ("private", None),
    "http://0.0.0.0:8080/a.jpg": ("reserved", None),
    "http://0.1.2.3/a.jpg": ("reserved", None),
    "http://[::]/a.jpg": ("reserved", None),
    "http://224.0.0.1/a.jpg": ("reserved", None),
    "http://[ff02::1]/a.jpg": ("reserved", None),
    "http://240.0.0.1/a.jpg": ("reserved", None),
    "http://255.255.255.255/a.jpg": ("reserved", None),
    # a name that does not resolve is not refused (the fetch fails by itself, and is retried)
    "http://gone.example/a.jpg": (None, None),
    "http://172.32.0.1/a.jpg": (None, None),              # just outside 172.16/12
}


@pytest.mark.parametrize("url", list(CASES))
def test_url_reasons(url):
    strict, lenient = CASES[url]
    assert url_reason(url, allow_private=False, resolve=FakeDNS()) == strict
    assert url_reason(url, allow_private=True, resolve=FakeDNS()) == lenient


@pytest.mark.parametrize("addr,reason", [
    ("8.8.8.8", None), ("2606:4700::1111", None), ("172.15.255.255", None), ("100.128.0.1", None),
    ("169.254.169.254", "metadata"), ("169.254.170.2", "metadata"), ("168.63.129.16", "metadata"),
    ("169.254.0.1", "link_local"), ("fe80::abcd", "link_local"), ("::ffff:127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"), ("::1", "loopback"), ("10.255.255.255", "private"),
    ("2002:a9fe:a9fe::1", "metadata"),  # 6to4 of 169.254.169.254
    ("not an address", "reserved"),      # a resolver answering garbage is not trusted
])
def test_address_reasons(addr, reason):
    assert address_reason(addr) == reason


def test_refused_schemes_literals_and_metadata_names_need_no_lookup():
    dns = FakeDNS()
    for url in ("file:///etc/passwd", "ftp://x.example/a", "http://10.0.0.1/", "http://127.1/",
                "http://metadata.google.internal/", "http://[::1]/", "data:,x"):
        url_reason(url, resolve=dns)
    assert dns.asked == []


def test_url_target_is_what_urllib_and_http_client_would_contact():
    assert url_target("http://user:pw@127.0.0.1:8080/x") == ("http", "user:pw@127.0.0.1")  # http.client's host
    assert url_target("HTTP://[fe80::1%25eth0]:80/") == ("http", "fe80::1%eth0")
    assert url_target("http://a.example#frag/../") == ("http", "a.example")
    assert url_target("file:///etc/passwd") == ("file", "")
    with pytest.raises(ValueError):
        url_target("no-scheme.example/a.jpg")


def test_host_reason_without_resolver_judges_by_name_only():
    assert host_reason("images.example", resolve=None) is None
    assert host_reason("metadata.google.internal", resolve=None) == "metadata"
    assert host_reason("", resolve=None) == "invalid_url"


def test_host_checker_looks_each_host_up_once():
    dns = FakeDNS()
    checker = HostChecker(allow_private=False, resolve=dns, threads=4)
    first = checker.reasons(["images.example", "intranet.example", "images.example", "gone.example"])
    again = checker.reasons(["intranet.example", "cdn.example"])
    assert first == {"images.example": None, "intranet.example": "private", "gone.example": None}
    assert again == {"intranet.example": "private", "cdn.example": None}
    assert sorted(dns.asked) == ["cdn.example", "gone.example", "images.example", "intranet.example"]


def test_list_filter_agrees_with_the_rules_row_by_row():
    """apply_address_policy judges each distinct scheme://authority once (a regex in C picks it);
    on a shuffled list of every case above, repeated, with odd rows among them, it refuses
    exactly the rows url_reason refuses, counts them by reason, and looks each name up once."""
    odd = ["http://bücher.example/a.jpg", "http://images.example /a.jpg", "http://images.example\t/a",
           "  http://10.0.0.1/a  ", "http://images.example"]
    DNS_ODD = {"bücher.example": ["10.9.9.9"]}
    urls = (list(CASES) + odd) * 3
    random.Random(0).shuffle(urls)

    def resolve(host: str) -> list[str]:
        return DNS_ODD[host] if host in DNS_ODD else FakeDNS()(host)

    for allow in (False, True):
        asked: list[str] = []

        def counted(host: str) -> list[str]:
            asked.append(host)
            return resolve(host)

        # Two chunks, as a list read in pieces arrives.
        half = len(urls) // 2
        table = pa.table({"url": pa.chunked_array([urls[:half], urls[half:]], pa.string()),
                          "caption": [str(i) for i in range(len(urls))]})
        counts: dict[str, int] = {}
        kept = apply_address_policy(table, "url", HostChecker(allow, counted), counts)
        want = [url_reason(u, allow, resolve) for u in urls]
        assert kept["url"].to_pylist() == [u for u, r in zip(urls, want) if r is None]
        expected = {f"refused_{r}": 0 for r in REASONS}
        for r in want:
            if r is not None:
                expected[f"refused_{r}"] = expected.get(f"refused_{r}", 0) + 1
        assert counts == expected
        assert asked and len(asked) == len(set(asked)), asked  # once per distinct host
