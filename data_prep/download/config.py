"""The download stage's config: which URL list, how it is read and filtered, which images to keep.

Defaults are safe for web data: a declared pixel count over ``max_image_pixels`` is refused from
the header before decoding; a shorter side under ``min_image_size`` (tracking pixels, icons) and a
long/short ratio over ``max_aspect_ratio`` (banners, spacer strips) are dropped; a server's
``X-Robots-Tag: noai`` (and friends) is honoured. Each of these can be turned off (``0``,
``null``, ``[]``). Every rejected row is counted by reason in the stage's manifest.

Only ``http``/``https`` URLs of public addresses are fetched (data_prep.download.address_policy):
``file://`` and other schemes, cloud metadata services and link-local addresses are always
refused, loopback and private ranges unless ``allow_private_addresses`` (which ``url_list: demo``,
served on 127.0.0.1, implies when the spec does not set it).

Local URL lists are checked when the spec is validated (columns present, text columns decodable,
filter columns numeric), so a bad list fails before any worker starts, naming the file and row.
"""
from __future__ import annotations

import codecs
import os
from typing import ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from data_prep.demo_corpus import DemoCorpusConfig
from data_prep.image_decode import DEFAULT_MAX_PIXELS
from pipeline.configbase import StrictModel, TaskPlacement

DEMO = "demo"
INPUT_FORMATS = ("parquet", "csv", "tsv", "jsonl", "json")
# img2dataset writes these into every sample's json itself; a list column of the same name would clash.
RESERVED_COLUMNS = ("key", "caption", "url", "width", "height", "original_width", "original_height",
                    "status", "error_message", "exif", "md5", "sha256", "sha512")
DEFAULT_DISALLOWED_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")


class RangeFilter(StrictModel):
    """Keep a row only if its value lies in [min, max] (either bound may be omitted)."""

    min: float | None = Field(None, description="Smallest value kept (inclusive); null = no lower bound.")
    max: float | None = Field(None, description="Largest value kept (inclusive); null = no upper bound.")

    @model_validator(mode="after")
    def _some_bound(self) -> "RangeFilter":
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both (e.g. {min: 0.28})")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is larger than max {self.max}")
        return self


class DownloadConfig(TaskPlacement):
    """The download stage: which URL list, how images are resized, how hard to try."""

    # How the work is scheduled, not what it produces: changing these must not re-run the stage.
    fingerprint_exclude: ClassVar[tuple[str, ...]] = ("processes_count", "thread_count", "resources")

    url_list: str = Field(
        DEMO,
        description="Path or URI (file://, s3://, gs://) of a URL list (parquet, csv, tsv, jsonl, json), or a folder "
        "of them; or 'demo': generate the synthetic demo corpus and serve it on 127.0.0.1 while the stage runs.",
    )
    input_format: Literal["parquet", "csv", "tsv", "jsonl", "json"] | None = Field(
        None, validate_default=True,
        description="Format of url_list; inferred from its extension (or a folder's files) when omitted. "
        "json is an array of objects, jsonl one object per line; tsv is tab-separated without quoting.",
    )
    url_col: str = Field("url", min_length=1, description="Column holding the image URL (LAION: URL).")
    caption_col: str = Field("caption", min_length=1, description="Column holding the caption (LAION: TEXT).")
    column_names: list[str] | None = Field(
        None, description="For a csv/tsv without a header row: the names of its columns in file order "
        "(CC3M's TSV: [caption, url]). null: the first row is the header.",
    )
    caption_encoding: str | None = Field(
        None, description="Text encoding of the list's text columns when they are not UTF-8 (e.g. 'latin-1', "
        "'cp1252'). null: they must be UTF-8, and a row that is not fails validation naming the file and row.",
    )
    save_additional_columns: list[str] = Field(
        default_factory=list, description="Columns of the list copied into each sample's json "
        "(LAION: similarity, punsafe, pwatermark, aesthetic).",
    )
    filters: dict[str, RangeFilter] = Field(
        default_factory=dict, description="Rows kept only where each named numeric column lies in its range, "
        "applied before anything is downloaded; rows dropped are counted per column (filtered_<column>). "
        "E.g. {similarity: {min: 0.28}, punsafe: {max: 0.5}}. A null value fails the filter.",
    )
    image_size: int = Field(256, gt=0, description="Side of the stored images (square unless resize_mode is keep_ratio/no).")
    resize_mode: Literal["center_crop", "border", "keep_ratio", "no"] = Field(
        "center_crop",
        description="center_crop: shorter side to image_size then crop the centre; border: longer side to "
        "image_size then pad with white; keep_ratio: shorter side to image_size; no: keep as is.",
    )
    min_image_size: int = Field(
        32, ge=0, description="Drop images whose shorter side is below this (pixels); read from the header. "
        "The default keeps out tracking pixels and icons; 0 turns it off.",
    )
    max_aspect_ratio: float | None = Field(
        4.0, ge=1.0, description="Drop images whose long/short side ratio exceeds this (banners, spacer strips); "
        "read from the header. null = no limit.",
    )
    max_image_pixels: int | None = Field(
        DEFAULT_MAX_PIXELS, gt=0, description="Refuse images whose header declares more pixels than this, before "
        "decoding (decompression bombs: a 20000x20000 PNG is a few hundred KB). null = no limit (not advised).",
    )
    alpha_background: tuple[int, int, int] = Field(
        (255, 255, 255), description="RGB colour transparent images are composited on (0..255 each).",
    )
    number_sample_per_shard: int = Field(
        10000, gt=0,
        description="URL rows per output shard. Sample keys are 5 + ceil(log10(this)) digits "
        "(shard id, then index in the shard): 9 digits for 1001..10000.",
    )
    processes_count: int = Field(1, gt=0, description="Download processes (multiprocessing distributor).")
    thread_count: int = Field(16, gt=0, description="Download threads per process.")
    timeout: int = Field(10, gt=0, description="Socket timeout per request (connect, and each read), seconds.")
    request_deadline: float = Field(
        30.0, gt=0, description="Overall time one request may take (connect + whole body), seconds, on top of "
        "timeout: a server trickling a byte a second is cut off here (checked between reads).",
    )
    retries: int = Field(0, ge=0, description="Extra attempts per failed URL, at once.")
    retry_failed: int = Field(
        0, ge=0, le=5, description="Extra passes, after the whole list is done, that fetch again only the rows "
        "whose download failed for a transient reason (timeout, refused/reset connection, HTTP 408/425/429/5xx) "
        "or whose shard did not finish, into new shards after the others; counted as retried_rows, "
        "retry_successes. 0: one pass.",
    )
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: list(DEFAULT_DISALLOWED_DIRECTIVES),
        description="X-Robots-Tag directives that make img2dataset skip an image (counted as "
        "disallowed_by_header). [] honours none.",
    )
    allow_private_addresses: bool = Field(
        False, description="Also fetch URLs whose host is, or resolves to, a loopback (127.0.0.0/8, ::1), private "
        "(10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7) or reserved (0.0.0.0/8, multicast) address: a list "
        "served inside your own network. Off: such rows are refused before any request (refused_<reason>). Cloud "
        "metadata services and link-local addresses are refused either way, and so is any scheme but http/https. "
        "url_list 'demo' (served on 127.0.0.1) sets it when not given.",
    )
    min_success_rate: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Fail the stage when fewer than this fraction of rows (after filters) became samples.",
    )
    demo: DemoCorpusConfig = Field(
        default_factory=DemoCorpusConfig, description="The synthetic corpus, used only when url_list is 'demo'."
    )

    @model_validator(mode="before")
    @classmethod
    def _demo_allows_loopback(cls, data: object) -> object:
        # The demo corpus is served on 127.0.0.1: a demo spec that says nothing must still download it.
        if isinstance(data, dict) and "allow_private_addresses" not in data \
                and str(data.get("url_list", DEMO)).strip() == DEMO:
            return {**data, "allow_private_addresses": True}
        return data

    @field_validator("url_list")
    @classmethod
    def _url_list_exists(cls, v: str) -> str:
        v = v.strip()
        if v == DEMO:
            return v
        if not v:
            raise ValueError("url_list is empty; give a parquet/csv/tsv/jsonl/json path or URI, or 'demo'")
        local = local_path(v)
        if local is not None and not os.path.exists(local):
            raise ValueError(f"url_list file {local!r} does not exist (give a parquet/csv/tsv/jsonl/json path or "
                             "URI, or 'demo')")
        return v

    @field_validator("input_format")
    @classmethod
    def _infer_format(cls, v: str | None, info: ValidationInfo) -> str | None:
        url_list = info.data.get("url_list")
        if v is not None or url_list is None or url_list == DEMO:
            return v
        inferred = infer_input_format(url_list)
        if inferred is None:
            raise ValueError(f"cannot infer input_format from url_list {url_list!r}; set it to one of "
                             f"{', '.join(INPUT_FORMATS)}")
        return inferred

    @field_validator("caption_encoding")
    @classmethod
    def _known_encoding(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return codecs.lookup(v).name
        except LookupError:
            raise ValueError(f"unknown text encoding {v!r} (e.g. 'utf-8', 'latin-1', 'cp1252', 'shift_jis')") from None

    @field_validator("alpha_background")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in v):
            raise ValueError(f"each of R, G, B must be 0..255, got {list(v)}")
        return v

    @field_validator("save_additional_columns")
    @classmethod
    def _not_reserved(cls, v: list[str]) -> list[str]:
        clash = [c for c in v if c in RESERVED_COLUMNS]
        if clash:
            raise ValueError(f"{clash} are written by img2dataset itself; allowed: any other column of the list")
        return v

    @model_validator(mode="after")
    def _check_list(self) -> "DownloadConfig":
        if self.url_list == DEMO:
            if not self.allow_private_addresses:
                raise ValueError("url_list 'demo' is served on 127.0.0.1, which allow_private_addresses: false refuses; "
                                 "set it to true (or leave it out)")
            if self.demo.image_size < self.min_image_size:
                raise ValueError(f"demo.image_size {self.demo.image_size} is below min_image_size "
                                 f"{self.min_image_size}: every demo image would be dropped; lower min_image_size")
            return self
        if self.column_names is not None and self.input_format not in ("csv", "tsv"):
            raise ValueError(f"column_names is for a header-less csv/tsv; input_format is {self.input_format}")
        # Only local files: checking a remote list here would need credentials at validation time
        # (the stage runs the same checks on it when it reads it).
        local = local_path(self.url_list)
        if local is not None and os.path.exists(local):
            from data_prep.download.url_list import check_url_list  # heavy: pyarrow's readers, only for a list to read

            check_url_list(self, local)
        return self


def local_path(uri: str) -> str | None:
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return None if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def infer_input_format(uri: str) -> str | None:
    lower = uri.lower().rstrip("/")
    for fmt in INPUT_FORMATS:
        if lower.endswith("." + fmt):
            return fmt
    local = local_path(uri)
    if local is not None and os.path.isdir(local):
        names = os.listdir(local)
        for fmt in INPUT_FORMATS:
            if any(n.endswith("." + fmt) for n in names):
                return fmt
    return None
