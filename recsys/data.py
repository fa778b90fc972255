"""Interaction loaders: every source becomes one frame ``user_id`` (Utf8), ``item_id`` (Utf8), ``ts`` (f64).

One canonical shape means splits, training and evaluation never care where the data came from. Rows keep
file order; the caller sorts (``recsys.splits`` sorts stably by time, then by file order).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from recsys.errors import DataError

if TYPE_CHECKING:
    from recsys.synthetic import SyntheticConfig

DEFAULT_SOURCE = "ml-100k"
COLUMNS = ("user_id", "item_id", "ts")

USER_CANDIDATES = ("user_id", "userId", "user", "UserId")
ITEM_CANDIDATES = ("item_id", "itemId", "movieId", "item", "product_id", "asin")
TIME_CANDIDATES = ("timestamp", "ts", "time", "datetime", "date", "event_time")

ACCEPTED = (
    "'ml-100k', 'synthetic' or 'synthetic:key=value,...', or a path to u.data, ratings.dat, ratings.csv, "
    "a RecBole .inter file, or a .csv/.tsv/.parquet file"
)
ISO_FORMATS = (
    *(
        f"%Y-%m-%d{sep}{clock}{zone}"
        for zone in ("%:z", "%z", "")
        for clock in ("%H:%M:%S%.f", "%H:%M")
        for sep in ("T", " ")
    ),
    "%Y-%m-%d",
)
TIME_FORMATS = "epoch seconds, any sortable number, a datetime/date column, or ISO-8601 text (2024-05-01T12:30:00Z)"


def load_interactions(
    source: str = DEFAULT_SOURCE,
    *,
    user_col: str | None = None,
    item_col: str | None = None,
    time_col: str | None = None,
) -> pl.DataFrame:
    """Load interactions from a named dataset, a synthetic spec or a file, as ``user_id, item_id, ts``.

    ``source`` is ``"ml-100k"`` (the copy shipped inside the ``recbole`` package), ``"synthetic"`` /
    ``"synthetic:users=500,events=20000"`` (see ``recsys.synthetic.SyntheticConfig``), or a path. Column
    names are only needed for generic ``.csv``/``.tsv``/``.parquet`` files whose names are not common ones.
    Raises ``DataError`` (one line with a fix) for anything the user can correct.
    """
    if source == "synthetic" or source.startswith("synthetic:"):
        return _load_synthetic(source)
    path = _recbole_file("ml-100k") if source == DEFAULT_SOURCE else Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"no dataset or file named {source!r}", f"use {ACCEPTED}")
    raw, user_col, item_col, time_col = _read(path, user_col, item_col, time_col)
    return _normalise(raw, path, user_col, item_col, time_col)


#: RecBole's MovieLens item columns, renamed to what an API client expects.
ATTRIBUTE_NAMES = {"movie_title": "title", "release_year": "year", "class": "genres"}
#: Names an item file's title column may have (after the renames above).
TITLE_CANDIDATES = ("title", "name", "item_name", "product_name")
#: Attribute names a ranked item already uses in the API: such columns get an ``item_`` prefix.
RESERVED_ATTRIBUTES = ("item_id", "score", "rank")
#: A ``token`` column whose values are whole numbers at least this often is read as integers.
WHOLE_SHARE = 0.95


def load_item_metadata(source: str = DEFAULT_SOURCE) -> pl.DataFrame | None:
    """Item attributes shipped beside the interactions, or ``None`` when the source has none.

    Where they come from: ``ml-100k`` → ``ml-100k.item`` in the same recbole package (titles, release year,
    genres); a RecBole ``X.inter`` path → ``X.item`` beside it when present; anything else has none. See
    :func:`read_item_file` for the frame's shape.
    """
    if source == DEFAULT_SOURCE:
        path = _recbole_file("ml-100k").with_suffix(".item")
    elif source == "synthetic" or source.startswith("synthetic:"):
        return None
    else:
        given = Path(source).expanduser()
        if given.suffix.lower() != ".inter":
            return None
        path = given.with_suffix(".item")
    return read_item_file(path) if path.is_file() else None


def read_item_file(path: Path) -> pl.DataFrame:
    """A RecBole ``.item`` file (tab-separated, typed header ``name:type``) as ``item_id`` + one column per attribute.

    Types follow the header: ``token`` → text (or integers when at least 95 % of the values are whole numbers, e.g.
    a year; the others become null),
    ``token_seq`` → a list of text split on spaces (e.g. genres), ``float`` → float, ``float_seq`` → list of
    floats; the title column stays one text. Column names lose their type and are renamed by
    :data:`ATTRIBUTE_NAMES`; the first of :data:`TITLE_CANDIDATES` becomes ``title``. Empty values are null;
    an item listed twice keeps its first row.
    """
    try:
        raw = pl.read_csv(path, separator="\t", infer_schema=False, quote_char=None)
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read item file {path}: {first}", "check that it is a RecBole .item file") from None
    types = {}
    for column in raw.columns:
        name, _, kind = column.partition(":")
        types[ATTRIBUTE_NAMES.get(name, name)] = (column, kind or "token")
    item_col = next((n for n in ("item_id", *ITEM_CANDIDATES) if n in types), None)
    if item_col is None:
        raise DataError(f"no item id column in item file {path} (columns: {', '.join(raw.columns)})", "name it item_id")
    title = next((n for n in TITLE_CANDIDATES if n in types and n != item_col), None)
    columns: dict[str, pl.Series] = {"item_id": _as_text(raw.get_column(types[item_col][0]))}
    for name, (column, kind) in types.items():
        if name == item_col:
            continue
        text = raw.get_column(column).str.strip_chars().replace("", None)
        out = "title" if name == title else f"item_{name}" if name in RESERVED_ATTRIBUTES else name
        columns[out] = text if out == "title" else _typed(text, kind)
    frame = pl.DataFrame(columns).filter(pl.col("item_id").is_not_null())
    return frame.unique("item_id", keep="first", maintain_order=True)


def _typed(text: pl.Series, kind: str) -> pl.Series:
    """One attribute column by its RecBole type (see :func:`read_item_file`)."""
    if kind == "token_seq":
        return text.str.split(" ")
    if kind == "float":
        return text.cast(pl.Float64, strict=False)
    if kind == "float_seq":
        return text.str.split(" ").list.eval(pl.element().cast(pl.Float64, strict=False))
    whole = text.str.contains(r"^-?\d{1,18}$").drop_nulls()
    # ML-100K's years hold a stray 'unkonwn': it becomes null, not the whole column text
    if whole.len() and whole.sum() >= WHOLE_SHARE * whole.len():
        return text.cast(pl.Int64, strict=False)
    return text


def fingerprint(df: pl.DataFrame) -> str:
    """Stable sha256 hex of an interaction frame, to tie a model bundle to the exact data it saw.

    Built from raw bytes (string payloads + their lengths, numeric buffers), not from polars' row hash,
    so it is identical across processes, runs and polars versions. About 0.1 s per million rows.
    """
    h = hashlib.sha256()
    h.update(f"rows={df.height};".encode())
    for name in df.columns:
        s = df.get_column(name)
        h.update(f"col={name}:{s.dtype};".encode())
        h.update(s.is_null().to_numpy().tobytes())
        if s.dtype == pl.Utf8:
            s = s.fill_null("")
            h.update(s.str.len_bytes().cast(pl.UInt64).to_numpy().tobytes())
            h.update(s.str.join("").item().encode())
        elif s.dtype.is_numeric() or s.dtype == pl.Boolean:
            h.update(np.ascontiguousarray(s.fill_null(0).to_numpy()).tobytes())
        else:
            text = s.cast(pl.Utf8).fill_null("")
            h.update(text.str.len_bytes().cast(pl.UInt64).to_numpy().tobytes())
            h.update(text.str.join("").item().encode())
    return h.hexdigest()


def _recbole_file(name: str) -> Path:
    """Find RecBole's bundled example without importing recbole (installed without its dependencies)."""
    spec = importlib.util.find_spec("recbole")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "dataset_example" / name / f"{name}.inter"
        if path.is_file():
            return path
    raise DataError(
        f"dataset {name!r} not found: the recbole package (which ships it) is missing or incomplete",
        "run `uv sync`, or pass a path to your own copy of u.data / ml-100k.inter",
    )


def _load_synthetic(source: str) -> pl.DataFrame:
    """Parse ``synthetic:key=value,...`` (:func:`synthetic_config`) and generate."""
    from recsys.synthetic import generate

    return generate(synthetic_config(source))


def synthetic_config(source: str) -> SyntheticConfig:
    """The ``SyntheticConfig`` of ``synthetic:key=value,...`` (DataError with the fix for a bad option)."""
    from recsys.synthetic import SyntheticConfig

    fields = {f.name: f.type for f in dataclasses.fields(SyntheticConfig)}
    valid = ", ".join(fields)
    params: dict[str, int | float] = {}
    spec = source.partition(":")[2].strip()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, value = (x.strip() for x in part.partition("="))
        if not eq or not key:
            raise DataError(
                f"bad synthetic option {part!r}", f"write key=value, e.g. synthetic:users=500; keys: {valid}"
            )
        if key not in fields:
            raise DataError(f"unknown synthetic option {key!r}", f"valid keys: {valid}")
        try:
            number = float(value)
        except ValueError:
            raise DataError(f"synthetic option {key}={value!r} is not a number", "use e.g. users=500") from None
        if fields[key] in ("int", int):
            if not number.is_integer():
                raise DataError(f"synthetic option {key}={value!r} must be a whole number", "use e.g. users=500")
            params[key] = int(number)
        else:
            params[key] = number
    return SyntheticConfig(**params)  # type: ignore[arg-type]


def _read_table(path: Path) -> pl.DataFrame:
    """Read a file by its name/extension; every text column stays Utf8 so ids like '007' keep their form."""
    name, suffix = path.name.lower(), path.suffix.lower()
    try:
        if name == "u.data":
            return pl.read_csv(
                path,
                separator="\t",
                has_header=False,
                infer_schema=False,
                quote_char=None,
                new_columns=["user_id", "item_id", "rating", "timestamp"],
            )
        if name.endswith(".dat"):
            # `::`-separated (MovieLens 1M/10M); splitting on ':' leaves empty columns between fields.
            raw = pl.read_csv(path, separator=":", has_header=False, infer_schema=False, quote_char=None)
            if raw.width < 7:
                raise DataError(f"{path} is not a user::item::rating::timestamp file", "check the file format")
            return raw.select(
                pl.col(raw.columns[0]).alias("user_id"),
                pl.col(raw.columns[2]).alias("item_id"),
                pl.col(raw.columns[6]).alias("timestamp"),
            )
        if suffix == ".inter":
            raw = pl.read_csv(path, separator="\t", infer_schema=False, quote_char=None)
            return raw.rename({c: c.split(":", 1)[0] for c in raw.columns})
        if suffix == ".parquet":
            return pl.read_parquet(path)
        if suffix in (".csv", ".tsv", ".txt"):
            sep = "," if suffix == ".csv" else "\t"
            return pl.read_csv(path, separator=sep, infer_schema=False)
    except DataError:
        raise
    except pl.exceptions.NoDataError:
        raise DataError(f"{path} is empty", "point to a file with interactions") from None
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read {path}: {first}", "check that the file is a valid table") from None
    raise DataError(f"unsupported file type {path.name!r}", f"use {ACCEPTED}")


def _read(
    path: Path, user_col: str | None, item_col: str | None, time_col: str | None
) -> tuple[pl.DataFrame, str, str, str]:
    """Read the file and resolve the three column names (given or guessed)."""
    raw = _read_table(path)
    user = _pick(raw, path, user_col, USER_CANDIDATES, "user")
    item = _pick(raw, path, item_col, ITEM_CANDIDATES, "item")
    time = _pick(raw, path, time_col, TIME_CANDIDATES, "time")
    if raw.height == 0:
        raise DataError(f"{path} has no rows", "point to a file with interactions")
    return raw, user, item, time


def _pick(raw: pl.DataFrame, path: Path, given: str | None, candidates: tuple[str, ...], role: str) -> str:
    """Return the column for ``role``: the one given, else the first common name (case-insensitive)."""
    columns = ", ".join(raw.columns)
    if given is not None:
        if given in raw.columns:
            return given
        raise DataError(
            f"column {given!r} not found in {path} (columns: {columns})",
            f"pass --{role}-col with one of them",
        )
    for name in candidates:
        if name in raw.columns:
            return name
    lowered = {c.lower(): c for c in raw.columns}
    for name in candidates:
        if name.lower() in lowered:
            return lowered[name.lower()]
    raise DataError(
        f"no {role} column found in {path} (columns: {columns}; looked for {', '.join(candidates)})",
        f"pass --{role}-col NAME",
    )


def _normalise(raw: pl.DataFrame, path: Path, user_col: str, item_col: str, time_col: str) -> pl.DataFrame:
    """Cast to the canonical frame and reject nulls."""
    df = pl.DataFrame(
        {
            "user_id": _as_text(raw.get_column(user_col)),
            "item_id": _as_text(raw.get_column(item_col)),
            "ts": to_seconds(raw.get_column(time_col), time_col, str(path)),
        }
    )
    bad = df.select(pl.any_horizontal(pl.all().is_null()).sum()).item()
    if bad:
        raise DataError(
            f"{bad} of {df.height} rows in {path} have an empty user, item or time "
            f"(columns {user_col!r}, {item_col!r}, {time_col!r})",
            "drop or fill those rows first",
        )
    return df


def _as_text(s: pl.Series) -> pl.Series:
    """Ids as stripped strings; empty strings count as missing."""
    text = s.cast(pl.Utf8).str.strip_chars()
    return text.replace("", None)


def to_seconds(s: pl.Series, column: str = "ts", where: str = "the data") -> pl.Series:
    """Turn a time column into sortable Float64 (epoch seconds for datetimes; numbers kept as they are).

    Accepts numbers (epoch seconds or any order number), datetimes/dates (naive = UTC), and text holding
    numbers or ISO-8601 datetimes. Nulls stay null (the caller counts them); unparsable text → DataError.
    """
    dtype = s.dtype
    if dtype.is_numeric():
        out = s.cast(pl.Float64)
        return out.fill_nan(None).alias("ts")
    if isinstance(dtype, pl.Datetime):
        return (s.dt.epoch("us").cast(pl.Float64) / 1e6).alias("ts")
    if dtype == pl.Date:
        return (s.cast(pl.Datetime("us")).dt.epoch("us").cast(pl.Float64) / 1e6).alias("ts")
    if dtype == pl.Utf8:
        text = s.str.strip_chars().replace("", None)
        numbers = text.cast(pl.Float64, strict=False)
        if numbers.null_count() == text.null_count():
            return numbers.fill_nan(None).alias("ts")
        parsed = _parse_datetimes(text)
        failed = parsed.is_null() & text.is_not_null()
        if failed.any():
            example = text.filter(failed).head(1).item()
            raise DataError(
                f"cannot parse time column {column!r} in {where}: e.g. {example!r} ({int(failed.sum())} bad rows)",
                f"use {TIME_FORMATS}, or pass --time-col",
            )
        return (parsed.dt.epoch("us").cast(pl.Float64) / 1e6).alias("ts")
    raise DataError(f"time column {column!r} in {where} has type {dtype}", f"use {TIME_FORMATS}")


def _parse_datetimes(text: pl.Series) -> pl.Series:
    """ISO-8601 text → UTC datetimes (null where unparsable); offsets are honoured, naive values are UTC.

    The format polars infers from the first value is tried first; rows it misses (mixed variants in one
    column, e.g. with and without offsets) fall back to the common ISO-8601 layouts one by one.
    """
    normalised = text.str.replace(r"[zZ]$", "+00:00")
    try:
        parsed = normalised.str.to_datetime(time_unit="us", time_zone="UTC", strict=False)
    except pl.exceptions.PolarsError:
        parsed = pl.Series(text.name, [None] * text.len(), dtype=pl.Datetime("us", "UTC"))
    for fmt in ISO_FORMATS:
        if parsed.null_count() == text.null_count():
            break
        parsed = parsed.fill_null(normalised.str.to_datetime(fmt, time_unit="us", time_zone="UTC", strict=False))
    return parsed
