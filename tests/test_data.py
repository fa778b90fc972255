"""Loaders: every source becomes user_id/item_id/ts, and every user mistake is a one-line DataError."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from recsys.data import fingerprint, load_interactions, to_seconds
from recsys.errors import DataError
from recsys.vocab import ItemVocab

SCHEMA = {"user_id": pl.Utf8, "item_id": pl.Utf8, "ts": pl.Float64}


def test_ml100k_loads_100k_rows_943_users_1682_items() -> None:
    df = load_interactions()
    assert dict(df.schema) == SCHEMA
    assert df.height == 100_000
    assert df.get_column("user_id").n_unique() == 943
    assert df.get_column("item_id").n_unique() == 1682
    assert df.row(0) == ("196", "242", 881250949.0)  # file order kept


def test_movielens_u_data_and_ratings_dat_and_ratings_csv(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text("1\t10\t5\t100\n2\t20\t3\t50\n")
    (tmp_path / "ratings.dat").write_text("1::10::5::100\n2::20::3::50\n")
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,5,100\n2,20,3,50\n")
    for name in ("u.data", "ratings.dat", "ratings.csv"):
        df = load_interactions(str(tmp_path / name))
        assert dict(df.schema) == SCHEMA
        assert df.rows() == [("1", "10", 100.0), ("2", "20", 50.0)], name


def test_recbole_inter_file_strips_type_suffixes(tmp_path: Path) -> None:
    path = tmp_path / "x.inter"
    path.write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\t007\t3\n")
    assert load_interactions(str(path)).rows() == [("u1", "007", 3.0)]


def test_generic_csv_tsv_parquet_with_guessed_and_given_columns(tmp_path: Path) -> None:
    frame = pl.DataFrame({"customer": ["a", "b"], "asin": ["x", "y"], "event_time": [2, 1]})
    frame.write_csv(tmp_path / "e.csv")
    frame.write_csv(tmp_path / "e.tsv", separator="\t")
    frame.write_parquet(tmp_path / "e.parquet")
    for name in ("e.csv", "e.tsv", "e.parquet"):
        df = load_interactions(str(tmp_path / name), user_col="customer")
        assert df.rows() == [("a", "x", 2.0), ("b", "y", 1.0)]


def test_time_parsing_epoch_iso_datetime_date_and_order_numbers(tmp_path: Path) -> None:
    assert to_seconds(pl.Series([1_600_000_000, 1_600_000_060])).to_list() == [1.6e9, 1.6e9 + 60]
    assert to_seconds(pl.Series(["3", "1", "2"])).to_list() == [3.0, 1.0, 2.0]  # an order sequence
    iso = pl.Series(["2020-01-01T00:00:00Z", "2020-01-01T02:00:00+01:00", "2020-01-01 00:00:30"])
    assert to_seconds(iso).to_list() == [1577836800.0, 1577840400.0, 1577836830.0]
    assert to_seconds(pl.Series(["2020-01-01", "2020-01-02"])).to_list() == [1577836800.0, 1577923200.0]
    when = pl.Series([dt.datetime(2020, 1, 1), dt.datetime(2020, 1, 1, 0, 0, 1, 500_000)])
    assert to_seconds(when).to_list() == [1577836800.0, 1577836801.5]
    assert to_seconds(pl.Series([dt.date(2020, 1, 2)])).to_list() == [1577923200.0]
    # Through a real file too: a parquet datetime column and a CSV with ISO text.
    pl.DataFrame({"user": ["a"], "item": ["b"], "datetime": [dt.datetime(2020, 1, 1)]}).write_parquet(
        tmp_path / "d.parquet"
    )
    assert load_interactions(str(tmp_path / "d.parquet")).get_column("ts").to_list() == [1577836800.0]
    (tmp_path / "i.csv").write_text("user,item,date\na,b,2020-01-02\n")
    assert load_interactions(str(tmp_path / "i.csv")).get_column("ts").to_list() == [1577923200.0]


def test_synthetic_source_and_options() -> None:
    df = load_interactions("synthetic:users=30,items=40,events=500,clusters=4,shift_prob=0.1,seed=3")
    assert dict(df.schema) == SCHEMA
    assert df.height == 500
    assert df.get_column("user_id").n_unique() == 30
    assert load_interactions("synthetic:events=1e3,users=10,items=20,clusters=2").height == 1000


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("make_source", "kwargs", "match"),
    [
        (lambda p: "ml-1b", {}, "no dataset or file named"),
        (lambda p: str(p / "missing.csv"), {}, "no dataset or file named"),
        (lambda p: _write(p, "empty.csv", ""), {}, "is empty"),
        (lambda p: _write(p, "header.csv", "user_id,item_id,ts\n"), {}, "has no rows"),
        (lambda p: _write(p, "a.csv", "who,item_id,ts\na,b,1\n"), {}, r"no user column found .*columns: who"),
        (lambda p: _write(p, "b.csv", "user_id,what,ts\na,b,1\n"), {}, "pass --item-col"),
        (lambda p: _write(p, "c.csv", "user_id,item_id,when\na,b,1\n"), {}, "no time column"),
        (lambda p: _write(p, "d.csv", "u,i,t\na,b,1\n"), {"user_col": "usr"}, r"column 'usr' not found"),
        (lambda p: _write(p, "e.csv", "user_id,item_id,ts\na,,1\nb,c,2\nd,e,\n"), {}, "2 of 3 rows"),
        (
            lambda p: _write(p, "f.csv", "user_id,item_id,ts\na,b,monday\n"),
            {},
            r"cannot parse time .*'monday'",
        ),
        (lambda p: _write(p, "g.json", "{}"), {}, "unsupported file type"),
        (lambda p: _write(p, "ratings.dat", "1,2,3\n"), {}, "not a user::item"),
        (lambda p: "synthetic:colours=3", {}, r"unknown synthetic option 'colours'.*valid keys: users"),
        (lambda p: "synthetic:users=abc", {}, "is not a number"),
        (lambda p: "synthetic:users", {}, "bad synthetic option"),
        (lambda p: "synthetic:users=2.5", {}, "whole number"),
        (lambda p: "synthetic:clusters=50,items=10", {}, "exceeds items"),
    ],
)
def test_user_mistakes_raise_one_line_data_error(
    tmp_path: Path, make_source: Callable[[Path], str], kwargs: dict[str, str], match: str
) -> None:
    with pytest.raises(DataError, match=match) as info:
        load_interactions(make_source(tmp_path), **kwargs)
    assert "\n" not in str(info.value)
    assert info.value.hint


def test_fingerprint_is_stable_across_processes_and_sensitive() -> None:
    df = load_interactions()
    fp = fingerprint(df)
    assert fp == fingerprint(df.clone()) and len(fp) == 64
    code = "from recsys.data import fingerprint, load_interactions; print(fingerprint(load_interactions()))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == fp
    changed = df.with_columns(
        pl.when(pl.int_range(pl.len()) == 5).then(pl.lit("x")).otherwise("item_id").alias("item_id")
    )
    assert fingerprint(changed) != fp
    assert fingerprint(df.with_columns(pl.col("ts") + 1)) != fp
    assert fingerprint(df.head(99_999)) != fp
    assert fingerprint(df.reverse()) != fp
    # Moving a character between adjacent ids changes it too (lengths are hashed with the bytes).
    a = pl.DataFrame({"user_id": ["ab", "c"], "item_id": ["x", "y"], "ts": [1.0, 2.0]})
    b = pl.DataFrame({"user_id": ["a", "bc"], "item_id": ["x", "y"], "ts": [1.0, 2.0]})
    assert fingerprint(a) != fingerprint(b)


def test_vocab_roundtrip_unknowns_and_deterministic_order() -> None:
    vocab = ItemVocab.from_items(pl.Series(["b", "a", "c", "a"]))
    assert vocab.ids == ["a", "b", "c"] and vocab.size == 5
    assert ItemVocab.from_items(["c", "b", "a"]) == vocab  # order of appearance does not matter
    assert vocab.encode(["c", "zz", "a"]).tolist() == [4, ItemVocab.UNK, 2]
    assert vocab.encode(pl.Series(["b"])).dtype.name == "int64"
    assert vocab.decode([2, 3, 4, 0, 1]) == ["a", "b", "c", "<pad>", "<unk>"]
    assert vocab.index_of("b") == 3 and vocab.index_of("nope") == ItemVocab.UNK
    assert "a" in vocab and "nope" not in vocab
    assert ItemVocab.from_json(vocab.to_json()) == vocab
    with pytest.raises(IndexError):
        vocab.decode([5])
