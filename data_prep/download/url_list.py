"""Reading a URL list as users have it (LAION parquet, CC3M header-less TSV, CSV, JSON lines).

The download stage does not hand the user's files to img2dataset as they are: it reads each one
here, decodes its text columns (UTF-8, or the declared ``caption_encoding``), applies the
``filters`` section, and writes one normalised parquet per input file (columns ``url``,
``caption`` and the ``save_additional_columns``) that img2dataset then shards exactly as it would
have sharded the originals (files in sorted order, ``number_sample_per_shard`` rows per shard).

Why: a CSV whose caption column holds one non-UTF-8 byte is typed ``binary`` by pyarrow, and
img2dataset then fails every row inside its writer while its stats still count them as
successes; here such a row is an error naming the file and row (or is decoded as declared).
Filters before download cost nothing per dropped row. Every dropped row is counted.

The address policy (data_prep.download.address_policy) is applied here too, after the filters:
a row it refuses (``file://``, a cloud metadata service, a private address unless
``allow_private_addresses``) is never handed to img2dataset and is counted as ``refused_<reason>``.
"""
from __future__ import annotations

import io
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from data_prep.download.address_policy import REASONS, HostChecker, Resolver, scheme_reason, system_resolve, url_target
from pipeline import store

# A URL this matches starts with its http(s) scheme (so urllib's unwrapping of whitespace and
# '<URL:...>' does not apply) and its authority holds no / ? # (where urllib cuts the host): urllib
# reads the same host from it as from ``scheme://authority/``, so the policy judges each distinct
# prefix once instead of each row. Other rows (other schemes, non-ASCII hosts, whitespace in the
# authority) are judged one by one, by urllib's own parser.
_SIMPLE_URL = (r"(?s)^(?P<scheme>[hH][tT][tT][pP][sS]?)://"
               r"(?P<authority>[A-Za-z0-9._~%!$&'()*+,;=:@\[\]-]*)(?:[/?#].*)?$")


class ListSpec(Protocol):
    """What of the download config this module reads (data_prep.download.config.DownloadConfig)."""

    url_col: str
    caption_col: str
    column_names: list[str] | None
    caption_encoding: str | None
    save_additional_columns: list[str]
    filters: dict[str, Any]  # column -> an object with .min / .max (None = unbounded)
    number_sample_per_shard: int
    input_format: str | None
    allow_private_addresses: bool


class UrlListError(ValueError):
    """A URL list that cannot be used as it is; the message names the file (and row)."""


@dataclass
class PreparedList:
    folder: str  # local folder of NNNNN.parquet files for img2dataset (input_format parquet)
    rows_per_shard: list[int]
    counts: dict[str, int] = field(default_factory=dict)


def list_files(url_list: str, fmt: str) -> tuple[Any, list[str]]:
    """(fsspec filesystem, sorted files) of a list file or a folder of ``*.{fmt}`` files."""
    fs, path = store.fs_and_path(url_list if "://" in url_list else store.normalize(url_list))
    if fs.isdir(path):
        files = sorted(fs.glob(path.rstrip("/") + f"/*.{fmt}"))
        if not files:
            raise UrlListError(f"url_list folder {url_list!r} holds no *.{fmt} files")
        return fs, files
    return fs, [path]


def _needed_columns(cfg: ListSpec) -> list[str]:
    cols = [cfg.url_col, cfg.caption_col, *cfg.save_additional_columns, *cfg.filters]
    return list(dict.fromkeys(cols))


def _text_columns(cfg: ListSpec) -> list[str]:
    return [cfg.url_col, cfg.caption_col]


def _read_csv(data: bytes, cfg: ListSpec, fmt: str) -> pa.Table:
    tsv = fmt == "tsv"
    read = pacsv.ReadOptions(column_names=cfg.column_names, block_size=1 << 24)
    # TSV as the format defines it (and CC3M writes it): fields hold no tabs/newlines, no quoting,
    # so a caption that starts with a quote is read as it is.
    parse = pacsv.ParseOptions(delimiter="\t" if tsv else ",", quote_char=False if tsv else '"')
    names = cfg.column_names or _csv_header(data, read, parse)
    missing = [c for c in _needed_columns(cfg) if c not in names]
    if missing:
        raise _MissingColumns(missing, names)
    # Text columns read as raw bytes: decoding (and pointing at a bad row) is done here, not by
    # pyarrow's inference, which silently types a column binary when one row is not UTF-8.
    types = {c: pa.binary() for c in _text_columns(cfg)}
    conv = pacsv.ConvertOptions(column_types=types, include_columns=_needed_columns(cfg))
    return pacsv.read_csv(io.BytesIO(data), read_options=read, parse_options=parse, convert_options=conv)


def _csv_header(data: bytes, read: pacsv.ReadOptions, parse: pacsv.ParseOptions) -> list[str]:
    head = data[: 1 << 20]
    head = head[: head.find(b"\n") + 1] if b"\n" in head else head
    with pacsv.open_csv(io.BytesIO(head), read_options=read, parse_options=parse,
                        convert_options=pacsv.ConvertOptions(column_types={})) as r:
        return list(r.schema.names)


class _MissingColumns(Exception):
    def __init__(self, missing: list[str], have: list[str]):
        self.missing, self.have = missing, have


def _read_json(data: bytes, cfg: ListSpec, fmt: str, name: str) -> pa.Table:
    enc = cfg.caption_encoding or "utf-8"
    try:
        text = data.decode(enc)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UrlListError(f"{name}: line {line} is not valid {enc} (byte 0x{data[e.start]:02x}); "
                           "set download.caption_encoding to the file's encoding (e.g. 'latin-1')") from None
    if fmt == "jsonl":
        rows = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    else:
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise UrlListError(f"{name}: a json url_list must be an array of objects (use jsonl for one per line)")
    cols = _needed_columns(cfg)
    have = list(dict.fromkeys(k for r in rows[:1000] for k in r)) if rows else cols
    missing = [c for c in cols if c not in have]
    if missing:
        raise _MissingColumns(missing, have)
    return pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows])


def read_list_file(fs: Any, path: str, cfg: ListSpec, fmt: str) -> pa.Table:
    """The needed columns of one list file, text columns decoded to strings; UrlListError names the file."""
    name = path
    try:
        if fmt == "parquet":
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                have = list(pf.schema_arrow.names)
                missing = [c for c in _needed_columns(cfg) if c not in have]
                if missing:
                    raise _MissingColumns(missing, have)
                table = pf.read(columns=_needed_columns(cfg))
        else:
            with fs.open(path, "rb") as f:
                data = f.read()
            table = _read_json(data, cfg, fmt, name) if fmt in ("json", "jsonl") else _read_csv(data, cfg, fmt)
    except _MissingColumns as e:
        fields = {c: "filters" for c in cfg.filters}
        fields.update({c: "save_additional_columns" for c in cfg.save_additional_columns})
        fields.update({cfg.url_col: "url_col", cfg.caption_col: "caption_col"})
        which = ", ".join(f"{fields[c]}: column {c!r}" for c in e.missing)
        hint = ("; if the file has no header row, name its columns with column_names (CC3M: [caption, url])"
                if fmt in ("csv", "tsv") and cfg.column_names is None else "")
        raise UrlListError(f"{which} not found in url_list {name!r}; its columns are {e.have}{hint}") from None
    except UrlListError:
        raise
    except Exception as e:  # pyarrow's messages do not name the file
        raise UrlListError(f"url_list {name!r} is not a readable {fmt} file: {e}") from e
    for c in _text_columns(cfg):
        table = table.set_column(table.schema.get_field_index(c), c, _decode(table[c], cfg, c, name))
    for c in cfg.save_additional_columns:
        if pa.types.is_binary(table[c].type) or pa.types.is_large_binary(table[c].type):
            table = table.set_column(table.schema.get_field_index(c), c, _decode(table[c], cfg, c, name))
    return table


def _decode(col: pa.ChunkedArray, cfg: ListSpec, name: str, file: str) -> pa.ChunkedArray:
    """A text column as strings: valid UTF-8 kept, bytes decoded with caption_encoding or rejected."""
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            col.validate(full=True)  # parquet strings are not checked on read
            return col
        except pa.ArrowInvalid:
            bt = pa.large_binary() if pa.types.is_large_string(t) else pa.binary()
            col = pa.chunked_array([c.view(bt) for c in col.chunks], bt)
    elif pa.types.is_null(t):
        return col.cast(pa.string())
    elif not (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        return pc.cast(col, pa.string())  # numbers as text (an id column used as caption)
    enc = cfg.caption_encoding
    if enc in (None, "utf-8"):
        try:
            return col.cast(pa.string())  # validates UTF-8 in C
        except pa.ArrowInvalid:
            pass
        row, raw = _first_bad_utf8(col)
        raise UrlListError(
            f"{file}: column {name!r} row {row} is not valid UTF-8 ({raw[:60]!r}); set download.caption_encoding "
            "to the file's encoding (e.g. 'latin-1', 'cp1252') or fix the row")
    out = []
    for i, v in enumerate(col.to_pylist()):
        try:
            out.append(None if v is None else v.decode(enc))
        except UnicodeDecodeError:
            raise UrlListError(f"{file}: column {name!r} row {i + 1} is not valid {enc} ({v[:60]!r})") from None
    return pa.chunked_array([pa.array(out, pa.string())])


def _first_bad_utf8(col: pa.ChunkedArray) -> tuple[int, bytes]:
    """(1-based data row, its bytes) of the first value that is not UTF-8."""
    for i, v in enumerate(col.to_pylist()):
        if v is not None:
            try:
                v.decode("utf-8")
            except UnicodeDecodeError:
                return i + 1, v
    return 0, b""


def apply_filters(table: pa.Table, cfg: ListSpec, counts: dict[str, int], file: str) -> pa.Table:
    """Rows outside a filter's range (or null there) removed; each removal counted under the first
    filter (in spec order) it fails, as ``filtered_<column>``."""
    for col, rng in cfg.filters.items():
        values = table[col]
        if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
            raise UrlListError(f"filters.{col}: column {col!r} in {file} is {values.type}, not a number")
        keep = pc.is_valid(values)
        if rng.min is not None:
            keep = pc.and_(keep, pc.greater_equal(values, rng.min))
        if rng.max is not None:
            keep = pc.and_(keep, pc.less_equal(values, rng.max))
        keep = pc.fill_null(keep, False)
        before = table.num_rows
        table = table.filter(keep)
        counts[f"filtered_{col}"] = counts.get(f"filtered_{col}", 0) + before - table.num_rows
    return table


def apply_address_policy(table: pa.Table, url_col: str, checker: HostChecker, counts: dict[str, int]) -> pa.Table:
    """Rows whose URL the address policy refuses removed, each counted as ``refused_<reason>``.

    Cost: one regex pass over the URLs in C, then the policy (urllib's parse, a lookup per
    distinct host, through ``checker``'s cache) once per distinct scheme://authority, not per row.
    """
    prefixes, odd_urls = [], []
    for chunk in table[url_col].chunks:
        parts = pc.extract_regex(chunk, _SIMPLE_URL)  # null where the row is not a simple http(s) URL
        prefix = pc.binary_join_element_wise(pc.utf8_lower(pc.struct_field(parts, "scheme")),
                                             pc.struct_field(parts, "authority"), "://").cast(pa.string())
        prefixes.append(prefix)
        odd_urls.append(chunk.filter(pc.is_null(prefix)).to_pylist())
    distinct = pc.unique(pa.chunked_array(prefixes, pa.string()).drop_null())
    # Each distinct prefix and each odd row: a reason already (scheme, unparsable), or a host to judge.
    targets = [_target(p + "/") for p in distinct.to_pylist()]
    odd_targets = [[_target(u) for u in urls] for urls in odd_urls]
    hosts = [t for t in targets if not isinstance(t, _Refused)]
    hosts += [t for ts in odd_targets for t in ts if not isinstance(t, _Refused)]
    by_host = checker.reasons(hosts)

    def reason(t: str | _Refused) -> str | None:
        return t.reason if isinstance(t, _Refused) else by_host[t]

    prefix_reasons = pa.array([reason(t) for t in targets], pa.string())
    reasons = []
    for prefix, ts in zip(prefixes, odd_targets):
        r = pc.take(prefix_reasons, pc.index_in(prefix, value_set=distinct))
        if ts:
            r = pc.replace_with_mask(r, pc.is_null(prefix), pa.array([reason(t) for t in ts], pa.string()))
        reasons.append(r)
    reasons_col = pa.chunked_array(reasons, pa.string())
    for r in REASONS:
        counts.setdefault(f"refused_{r}", 0)
    if reasons_col.null_count == len(reasons_col):
        return table
    for item in pc.value_counts(reasons_col.drop_null()).to_pylist():
        key = f"refused_{item['values']}"
        counts[key] = counts.get(key, 0) + item["counts"]
    return table.filter(pc.is_null(reasons_col))


@dataclass(frozen=True)
class _Refused:
    reason: str  # a row refused for its scheme or form, with no host to look up


def _target(url: str) -> str | _Refused:
    """The host to judge for ``url``, or the reason it is refused without one."""
    try:
        scheme, host = url_target(url)
    except ValueError:
        return _Refused("invalid_url")
    reason = scheme_reason(scheme)
    return _Refused(reason) if reason is not None else host


def _prepare_file(fs: Any, path: str, cfg: ListSpec, fmt: str, out_path: str,
                  checker: HostChecker) -> tuple[int, dict[str, int]]:
    """One list file -> its normalised parquet (not written when no row is left); (rows, counts)."""
    counts: dict[str, int] = {}
    table = read_list_file(fs, path, cfg, fmt)
    counts["rows_in_list"] = table.num_rows
    table = apply_filters(table, cfg, counts, path)
    has_url = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(table[cfg.url_col])), 0), False)
    before = table.num_rows
    table = table.filter(has_url)
    counts["rejected_missing_url"] = before - table.num_rows
    table = apply_address_policy(table, cfg.url_col, checker, counts)
    cap = table[cfg.caption_col]
    counts["null_captions"] = cap.null_count
    counts["empty_captions"] = (pc.sum(pc.equal(pc.utf8_length(cap), 0).cast(pa.int64())).as_py() or 0
                                if table.num_rows else 0)
    if table.num_rows:  # img2dataset would write an empty shard for an empty file
        out = {"url": table[cfg.url_col], "caption": cap, **{c: table[c] for c in cfg.save_additional_columns}}
        pq.write_table(pa.table(out), out_path)
    return table.num_rows, counts


def prepare_url_list(cfg: ListSpec, url_list: str, fmt: str, out_dir: str,
                     resolve: Resolver | None = system_resolve) -> PreparedList:
    """Read, decode, filter every list file into ``out_dir/NNNNNNNN.parquet`` for img2dataset.

    Files are prepared on a few threads (pyarrow reads, casts and writes without the GIL): ~1.5 s
    per million LAION rows each, plus a lookup per distinct host (``resolve``, cached across the
    files); img2dataset then reads the normalised files as it would the originals.
    """
    fs, files = list_files(url_list, fmt)
    os.makedirs(out_dir, exist_ok=True)
    counts = {"rows_in_list": 0, "rejected_missing_url": 0, "null_captions": 0, "empty_captions": 0}
    counts.update({f"filtered_{c}": 0 for c in cfg.filters})
    counts.update({f"refused_{r}": 0 for r in REASONS})
    checker = HostChecker(cfg.allow_private_addresses, resolve)
    per = cfg.number_sample_per_shard

    def prepare(ip: tuple[int, str]) -> tuple[int, dict[str, int]]:
        return _prepare_file(fs, ip[1], cfg, fmt, os.path.join(out_dir, f"{ip[0]:08d}.parquet"), checker)

    with ThreadPoolExecutor(max_workers=min(4, len(files), os.cpu_count() or 1)) as pool:
        done = list(pool.map(prepare, enumerate(files)))
    rows_per_shard: list[int] = []
    for n, c in done:  # in file order: img2dataset cuts the sorted files into shards in this order
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v
        rows_per_shard += [min(per, n - k * per) for k in range(math.ceil(n / per))]
    return PreparedList(folder=out_dir, rows_per_shard=rows_per_shard, counts=counts)


def check_url_list(cfg: ListSpec, local: str) -> None:
    """Validation-time check of a local list (file or folder): every file readable, columns present,
    text columns decodable, filter columns numeric. Raises ValueError naming the file and row."""
    fmt = cfg.input_format or "parquet"
    try:
        fs, files = list_files(local, fmt)
        for path in files:
            if fmt == "parquet" and not _parquet_needs_scan(fs, path, cfg):
                continue
            table = read_list_file(fs, path, cfg, fmt)
            apply_filters(table, cfg, {}, path)
    except UrlListError as e:
        raise ValueError(str(e)) from None


def _parquet_needs_scan(fs: Any, path: str, cfg: ListSpec) -> bool:
    """Whether a parquet file must be read to validate it. Its schema settles the rest cheaply (a LAION
    part file is ~1M rows): columns present, filter columns numeric, text columns typed string."""
    try:
        with fs.open(path, "rb") as f:
            schema = pq.ParquetFile(f).schema_arrow
    except Exception:
        return True  # read_list_file names the file and pyarrow's complaint
    if any(c not in schema.names for c in _needed_columns(cfg)):
        return True
    for c in cfg.filters:
        t = schema.field(c).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
            return True
    return any(not (pa.types.is_string(schema.field(c).type) or pa.types.is_large_string(schema.field(c).type))
               for c in _text_columns(cfg))
