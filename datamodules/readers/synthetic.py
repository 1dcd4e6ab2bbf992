"""A seeded synthetic city: Foursquare-like check-ins with real structure to learn.

The suite's zero-config default run and its tests need data that is small, instant, offline and
still *learnable*: a next-location model trained on it should beat popularity baselines for the
same reasons it does on NYC/TKY. The generator therefore models the regularities that make real
check-in data predictable, and nothing else:

* **Space.** POIs sit in a handful of neighbourhoods (Gaussian clusters inside ``radius_km`` of the
  city centre). Each neighbourhood has a *type* (business district, residential area, nightlife
  district, campus, leisure/park area) with its own category mix, so category and location
  correlate: offices and coffee shops downtown, homes in residential areas, bars in the nightlife
  district.
* **Semantics.** Every POI has a Foursquare-style leaf category and its parent category, a
  generated name ("Hudson Coffee Shop") and a Manhattan-style address derived from its position
  (private homes have none, as on Foursquare).
* **People.** Each user has a home (a Residence POI), a workplace (an office or a college) and a
  small set of favourite places per activity, chosen near home or work. Users differ in their
  habits (work start time, coffee/lunch/going-out/gym propensities, how adventurous they are).
* **Time.** Weekdays follow home -> (transit) -> (coffee) -> work ~08-10 h -> lunch near work
  ~12-13 h -> evening out and/or home 18-23 h; weekends start later and favour brunch, parks, shops,
  culture, dinner and bars. Days are skipped at random and some users take a multi-day break, so
  cutting trajectories at 24 h gaps yields several multi-visit trajectories per user.
* **Noise.** Any leisure stop may be replaced by exploration of a new place (nearby, or anywhere),
  which also spreads visits over most POIs. Times carry random minutes and seconds.
* **Irregularity and popularity** (off at the defaults, calibrated in ``experiment=quickstart``): a day's
  whole schedule may shift by hours (``day_shift_h``), each stop may deviate on its own
  (``stop_jitter_h``), and some venues may draw everyone (``popularity``), so that a habit's hour and a
  user's new places are as uncertain as in real check-ins.
* **Sparse check-ins and shared routes** (off at the defaults, on in ``experiment=quickstart``): a user
  checks in at a share of their stops only (``checkin_rate``), and a try of somewhere new may go to the
  city's usual next place from where the user is (``shared_routes``), so that strangers share moves.

Everything is driven by ``seed`` (one ``numpy.random.default_rng(seed)``, and generators derived from the
seed for the two knobs above), so a seed fixes the city exactly.
"""

from __future__ import annotations

import math
import random

import numpy as np
import polars as pl

from datamodules.readers.city_tables import CATEGORIES, HOOD_ORDER, HOOD_TYPES, KINDS, NAME_NOUNS, NAME_WORDS
from datamodules.schema import to_canonical

_KM_PER_DEG_LAT = 111.32

def _ordinal(n: int) -> str:
    """``1 -> '1st'``, ``12 -> '12th'``, ``23 -> '23rd'``."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _spread_centres(rng: np.random.Generator, n: int, max_r: float) -> np.ndarray:
    """Pick ``n`` neighbourhood centres (km offsets) in a disk, roughly evenly spread.

    Greedy farthest-point selection over random candidates keeps neighbourhoods apart, so they
    stay distinguishable clusters instead of merging into one blob.
    """
    cand = rng.uniform(-max_r, max_r, size=(40 * n, 2))
    cand = cand[np.hypot(cand[:, 0], cand[:, 1]) <= max_r]
    chosen = [0]
    dmin = np.hypot(*(cand - cand[0]).T)
    for _ in range(n - 1):
        nxt = int(np.argmax(dmin))
        chosen.append(nxt)
        dmin = np.minimum(dmin, np.hypot(*(cand - cand[nxt]).T))
    return cand[chosen]


def _make_pois(rng: np.random.Generator, n_pois: int, radius_km: float) -> dict[str, np.ndarray]:
    """Place POIs in typed neighbourhoods and give each a category.

    Returns:
        Arrays ``xy`` (km east/north of the centre), ``hood`` (neighbourhood index), ``kind`` and
        ``category`` (object arrays of strings), plus ``hood_types``.
    """
    n_hoods = int(np.clip(n_pois // 40, 4, len(HOOD_ORDER)))
    hood_types = list(HOOD_ORDER[:n_hoods])
    centres = _spread_centres(rng, n_hoods, 0.6 * radius_km)
    sizes = np.array([HOOD_TYPES[t][2] for t in hood_types])
    hood = rng.choice(n_hoods, size=n_pois, p=sizes / sizes.sum())
    spread = np.array([HOOD_TYPES[t][1] for t in hood_types]) * radius_km

    # Gaussian scatter around the centre; redraw the few points that fall outside the city
    # (98% of the radius leaves room for the flat-earth approximation used here).
    xy = centres[hood] + rng.normal(size=(n_pois, 2)) * spread[hood, None]
    outside = np.hypot(xy[:, 0], xy[:, 1]) > 0.98 * radius_km
    while outside.any():
        redo = hood[outside]
        xy[outside] = centres[redo] + rng.normal(size=(redo.size, 2)) * spread[redo, None]
        outside = np.hypot(xy[:, 0], xy[:, 1]) > 0.98 * radius_km

    # Kind from the neighbourhood's mix, then a leaf category within the kind.
    kind = np.empty(n_pois, dtype=object)
    for h, t in enumerate(hood_types):
        members = np.flatnonzero(hood == h)
        mix = HOOD_TYPES[t][0]
        names, shares = list(mix), np.array(list(mix.values()))
        picks = rng.choice(len(names), size=len(members), p=shares / shares.sum())
        kind[members] = np.array(names, dtype=object)[picks]
    # Every city needs somewhere to live and somewhere to work, however few POIs it has.
    for needed, other, hood_type in (("home", "work", "residential"), ("work", "home", "business")):
        if (kind == needed).any():
            continue
        # Never convert the only POI of the other essential kind; prefer the fitting neighbourhood.
        cands = np.setdiff1d(np.arange(n_pois), np.flatnonzero(kind == other)[:1])
        fitting = cands[np.isin(hood[cands], [h for h, t in enumerate(hood_types) if t == hood_type])]
        kind[(fitting if fitting.size else cands)[0]] = needed
    category = np.empty(n_pois, dtype=object)
    for k in sorted(set(kind)):  # sorted: set order changes with PYTHONHASHSEED, the rng draws must not
        members = np.flatnonzero(kind == k)
        leaves = [c for c, (_, kk, _) in CATEGORIES.items() if kk == k]
        w = np.array([CATEGORIES[c][2] for c in leaves])
        picks = rng.choice(len(leaves), size=len(members), p=w / w.sum())
        category[members] = np.array(leaves, dtype=object)[picks]
    return {"xy": xy, "hood": hood, "kind": kind, "category": category, "hood_types": np.array(hood_types)}


def _names_and_addresses(
    rng: np.random.Generator, xy: np.ndarray, category: np.ndarray
) -> tuple[list[str], list[str | None]]:
    """Generate POI names ("Hudson Coffee Shop") and Manhattan-style addresses.

    Street numbers grow northwards and the East/West prefix follows the side of the centre, so an
    address carries (coarse) location information just as real ones do.
    """
    n = len(category)
    words = rng.integers(len(NAME_WORDS), size=n)
    noun_pick = rng.integers(1 << 30, size=n)
    house = rng.integers(1, 400, size=n)
    # ~80 m per block keeps street numbers in a plausible range for an 8 km city.
    street = np.maximum(1, np.round(60 + xy[:, 1] / 0.08)).astype(int)
    no_address = rng.random(n) < 0.05
    names: list[str] = []
    addresses: list[str | None] = []
    for i in range(n):
        cat = str(category[i])
        nouns = NAME_NOUNS.get(cat, (cat,))
        if cat == "Subway":
            names.append(f"{_ordinal(int(street[i]))} St Station")
        else:
            names.append(f"{NAME_WORDS[words[i]]} {nouns[noun_pick[i] % len(nouns)]}")
        # Private homes hide their address on Foursquare; a few other venues lack one too.
        if cat == "Home (private)" or no_address[i]:
            addresses.append(None)
        else:
            side = "W" if xy[i, 0] < 0 else "E"
            addresses.append(f"{house[i]} {side} {_ordinal(int(street[i]))} St")
    return names, addresses


def _pick_near(
    rng: np.random.Generator, pool: np.ndarray, dist: np.ndarray, scale_km: float, k: int,
    appeal: np.ndarray | None = None,
) -> list[int]:
    """Draw up to ``k`` distinct POIs from ``pool`` with weight ``exp(-dist / scale_km)`` (× ``appeal``).

    Args:
        rng: Random source.
        pool: Candidate POI indices.
        dist: Distance (km) of every POI to the anchor(s) the user cares about.
        scale_km: Distance at which preference decays by ``e``.
        k: How many to draw.
        appeal: Optional per-POI factor on the weights (how much a place draws people; None: 1).

    Returns:
        The chosen POI indices (fewer than ``k`` if the pool is small).
    """
    if pool.size == 0 or k <= 0:
        return []
    w = np.exp(-dist[pool] / scale_km) + 1e-9
    if appeal is not None:
        w = w * appeal[pool]
    return [int(p) for p in rng.choice(pool, size=min(k, pool.size), replace=False, p=w / w.sum())]


def _day_shift(hours: list[float], sd: float, gauss, tries: int = 50) -> float:
    """A shift of a whole day's stops (``hours``): normal with standard deviation ``sd``, truncated to the shifts
    that keep the day within 05:30-02:30 (a cut-off day would drop its last stop, mostly home, which would change
    which places are frequent, not when).

    Drawn again until it fits (a clipped draw would pile days onto the bounds: many check-ins at exactly
    05:30); after ``tries`` misses, the nearest fitting shift. A day longer than the window is not shifted.
    """
    low, high = 5.5 - min(hours), 26.5 - max(hours)
    if low > high:
        return 0.0
    for _ in range(tries):
        shift = gauss(0, sd)
        if low <= shift <= high:
            return shift
    return min(max(shift, low), high)


def generate_city(
    seed: int = 0,
    n_users: int = 60,
    n_pois: int = 300,
    days: int = 120,
    center: tuple[float, float] = (40.75, -73.98),
    radius_km: float = 8.0,
    start: str = "2012-04-02",
    timezone_offset_min: int = -240,
    explore: tuple[float, float] = (0.05, 0.2),
    home_am: tuple[float, float] = (0.2, 0.7),
    home_pm: tuple[float, float] = (0.6, 0.95),
    day_shift_h: tuple[float, float] = (0.0, 0.0),
    stop_jitter_h: tuple[float, float] = (0.0, 0.0),
    popularity: float = 0.0,
    checkin_rate: float = 1.0,
    shared_routes: float = 0.0,
) -> pl.DataFrame:
    """Generate the check-ins of a synthetic city (see the module docstring for what is modelled).

    Args:
        seed: Seed of ``numpy.random.default_rng``; the same seed gives the same frame.
        n_users: Number of users.
        n_pois: Number of POIs (at least 2: somewhere to live and somewhere to work).
        days: Number of simulated days, starting at ``start``.
        center: City centre as ``(lat, lon)`` in degrees.
        radius_km: Every POI lies within this distance of ``center``.
        start: First simulated (local) date, ``YYYY-MM-DD``.
        timezone_offset_min: Local time minus UTC, in minutes (-240 is New York in summer).
        explore: Range of the users' probability to try a new place instead of a favourite (drawn
            per user). The habit knobs: the defaults give a very routine city; ``experiment=quickstart``
            sets values calibrated to the NYC release (``benchmarks/calibrate_city.py``).
        home_am: Range of the probability to check in at home before work on a weekday.
        home_pm: Range of the probability to check in at home at the end of a weekday.
        day_shift_h: Range of the users' day-to-day irregularity: the standard deviation, in hours, of a
            normal shift drawn per active day (truncated to keep the day within 05:30-02:30) and applied to
            all of that day's stops (their order is kept). 0 keeps every day on the user's nominal schedule,
            as the defaults do.
        stop_jitter_h: Range of the users' standard deviation, in hours, of a deviation drawn for every
            stop on its own (after the day's shift); the day's stops are then taken in time order, so
            neighbours may swap. 0: every stop at its nominal time.
        popularity: How much some places draw everyone: each POI gets an appeal ``exp(N(0, 1))`` raised
            to this power, which multiplies its weight whenever a workplace, a favourite or a place to
            explore is picked, so that users share popular venues (0: no appeal, as the defaults do).
        checkin_rate: Share of the stops a user checks in at: each stop is kept with this probability, drawn
            from a generator of its own (seeded by ``seed``), as people on a location-based network check in
            at some of their stops only, so that consecutive check-ins skip stops and a day's order is less
            fixed than its hours (1: every stop, as the defaults do; the kept stops are the same city's).
        shared_routes: Probability that a try of somewhere new goes where the city goes next: every
            (place, activity) pair has one usual next place of that activity, drawn once per city by distance
            from the place (and appeal), so that strangers share moves (what a city-wide ``markov`` reads)
            without one venue drawing everyone (0: off, as the defaults do; no draw is made then).

    Returns:
        Canonical check-ins (:data:`datamodules.schema.CHECKIN_SCHEMA`), sorted by ``user_id`` and
        ``utc_time``; ``traj_id`` and ``split`` are null.

    Raises:
        ValueError: If a size is too small or ``radius_km`` is not positive.
    """
    if n_users < 1 or days < 1 or n_pois < 2:
        raise ValueError(f"need n_users >= 1, days >= 1 and n_pois >= 2; got {n_users}, {days}, {n_pois}")
    if not radius_km > 0:
        raise ValueError(f"radius_km must be positive, got {radius_km}")
    if min(day_shift_h) < 0 or day_shift_h[0] > day_shift_h[1]:
        raise ValueError(f"day_shift_h must be a range (low, high) of hours >= 0, got {day_shift_h}")
    if min(stop_jitter_h) < 0 or stop_jitter_h[0] > stop_jitter_h[1]:
        raise ValueError(f"stop_jitter_h must be a range (low, high) of hours >= 0, got {stop_jitter_h}")
    if popularity < 0:
        raise ValueError(f"popularity must be >= 0, got {popularity}")
    if not 0 < checkin_rate <= 1:
        raise ValueError(f"checkin_rate must be in (0, 1], got {checkin_rate}")
    if not 0 <= shared_routes <= 1:
        raise ValueError(f"shared_routes must be in [0, 1], got {shared_routes}")
    rng = np.random.default_rng(seed)

    # ---- the city -------------------------------------------------------------------------------
    pois = _make_pois(rng, n_pois, radius_km)
    xy, kind, category = pois["xy"], pois["kind"], pois["category"]
    names, addresses = _names_and_addresses(rng, xy, category)
    # Drawn only when asked for, so that a city without the knob stays the same city.
    appeal = np.exp(rng.normal(size=n_pois)) ** popularity if popularity > 0 else None
    pool = {k: np.flatnonzero(kind == k) for k in KINDS}
    # Exploration never lands in someone's residence: strangers do not check in at your home.
    public = np.flatnonzero(kind != "home")
    if public.size == 0:
        public = np.arange(n_pois)
    public_cdf = None if appeal is None else np.cumsum(appeal[public])

    # ---- the people -----------------------------------------------------------------------------
    users: list[dict] = []
    home_claims = np.zeros(n_pois)
    for _ in range(n_users):
        # Homes: prefer unclaimed residences so most people live in different places (a few share,
        # like flatmates or an apartment block).
        homes = pool["home"]
        w = 1.0 / (1.0 + 4.0 * home_claims[homes])
        home = int(rng.choice(homes, p=w / w.sum()))
        home_claims[home] += 1
        d_home = np.hypot(*(xy - xy[home]).T)
        # Workplace: a fifth study; commutes are usually, not always, short.
        student = pool["college"].size > 0 and rng.random() < 0.2
        work_pool = pool["college"] if student else (pool["work"] if pool["work"].size else pool["college"])
        work = _pick_near(rng, work_pool, d_home, 6.0, 1, appeal)[0]
        d_work = np.hypot(*(xy - xy[work]).T)
        d_either = np.minimum(d_home, d_work)
        fav = {
            "coffee": _pick_near(rng, pool["coffee"], d_either, 0.8, int(rng.integers(1, 3)), appeal),
            "lunch": _pick_near(rng, np.concatenate([pool["lunch"], pool["coffee"]]), d_work, 0.6,
                                int(rng.integers(2, 5)), appeal),
            "dinner": _pick_near(rng, pool["dinner"], d_either, 1.2, int(rng.integers(2, 4)), appeal),
            "bar": _pick_near(rng, pool["bar"], d_either, 2.0, int(rng.integers(1, 4)), appeal),
            "grocery": _pick_near(rng, pool["grocery"], d_home, 0.6, 1, appeal),
            "shop": _pick_near(rng, pool["shop"], d_either, 1.5, int(rng.integers(1, 3)), appeal),
            "gym": _pick_near(rng, pool["gym"], d_either, 1.0, 1, appeal),
            "park": _pick_near(rng, pool["park"], d_home, 2.0, int(rng.integers(1, 3)), appeal),
            "culture": _pick_near(rng, pool["culture"], d_either, 3.0, int(rng.integers(1, 3)), appeal),
            "transit": _pick_near(rng, pool["transit"], d_home, 0.5, 1, appeal),
        }
        # Users with no option for an activity fall back to places they already frequent.
        for k, v in fav.items():
            if not v:
                fav[k] = [work] if k in ("lunch", "coffee") else [home]
        # Habit weights: Zipf-like, so each user has a clear favourite per activity.
        fav_w = {k: [1.0 / (r + 1) for r in range(len(v))] for k, v in fav.items()}
        users.append({
            "home": home, "work": work, "fav": fav, "fav_w": fav_w,
            "work_start": float(np.clip(rng.normal(8.9, 0.55), 7.5, 10.2)),
            "p_active_wd": rng.uniform(0.3, 0.55), "p_active_we": rng.uniform(0.25, 0.5),
            "p_home_am": rng.uniform(*home_am), "p_transit": rng.uniform(0.0, 0.45),
            "p_coffee": rng.uniform(0.05, 0.8), "p_lunch": rng.uniform(0.35, 0.9),
            "p_out": rng.uniform(0.2, 0.7), "p_gym": rng.uniform(0.1, 0.5) if rng.random() < 0.5 else 0.0,
            "p_bar": rng.uniform(0.05, 0.5), "p_home_pm": rng.uniform(*home_pm),
            "p_explore": rng.uniform(*explore),
            # Drawn only when asked for, so that a city without the knob stays the same city.
            "day_shift": rng.uniform(*day_shift_h) if max(day_shift_h) > 0 else 0.0,
            "stop_jitter": rng.uniform(*stop_jitter_h) if max(stop_jitter_h) > 0 else 0.0,
            # Some users take a break (travel, illness) of a few days: long gaps happen in real logs.
            "break": (int(rng.integers(0, days)), int(rng.integers(3, 8))) if rng.random() < 0.3 else (-1, 0),
        })

    # ---- the days -------------------------------------------------------------------------------
    # The day loop makes tens of thousands of scalar draws; Python's Mersenne Twister does those
    # ~20x faster than a numpy Generator. It is seeded from ``rng``, so the seed still fixes all.
    pyr = random.Random(int(rng.integers(2**63)))
    start_day = np.datetime64(start, "D")
    weekday0 = int((start_day.astype(np.int64) + 3) % 7)  # 1970-01-01 was a Thursday; Monday = 0
    out_user: list[int] = []
    out_poi: list[int] = []
    out_sec: list[int] = []

    # The city's usual next place per (place, activity), drawn on first use from a generator of its own. The
    # coin that sends a try of somewhere new down a route is the users' generator's, so with the knob on the
    # later draws differ from the city without it; off (0), no coin is drawn and the city is the one before.
    routes: dict[tuple[int, str], int] = {}
    route_rng = random.Random(seed * 1_000_003 + 2) if shared_routes > 0 else None

    def near(k: str, here: int, r: random.Random) -> int:
        """A place of kind ``k`` near ``here`` (within a short walk, weighted by appeal), drawn with ``r``."""
        d = np.hypot(*(xy[pool[k]] - xy[here]).T)
        w = np.exp(-d / 1.0) + 1e-9
        if appeal is not None:
            w = w * appeal[pool[k]]
        return int(pool[k][np.searchsorted(np.cumsum(w), r.random() * w.sum())])

    def choose(u: dict, k: str, here: int) -> int:
        """A POI for activity ``k``: usually a favourite, sometimes somewhere new."""
        if pyr.random() < u["p_explore"]:
            if route_rng is not None and pool[k].size and pyr.random() < shared_routes:
                if (here, k) not in routes:
                    routes[here, k] = near(k, here, route_rng)
                return routes[here, k]
            if pyr.random() < 0.5 or pool[k].size == 0:
                if public_cdf is None:
                    return int(public[pyr.randrange(public.size)])
                return int(public[min(np.searchsorted(public_cdf, pyr.random() * public_cdf[-1]), public.size - 1)])
            return near(k, here, pyr)  # a new place of the right kind near where the user is now
        return pyr.choices(u["fav"][k], weights=u["fav_w"][k])[0]

    for ui, u in enumerate(users):
        home, work = u["home"], u["work"]
        b0, blen = u["break"]
        for day in range(days):
            if b0 <= day < b0 + blen:
                continue
            weekend = (weekday0 + day) % 7 >= 5
            friday_ish = (weekday0 + day) % 7 in (3, 4)  # Thursday/Friday evenings go out more
            if pyr.random() > (u["p_active_we"] if weekend else u["p_active_wd"]):
                continue
            stops: list[tuple[float, int]] = []  # (nominal local hour, poi)
            g = pyr.gauss
            if not weekend:
                ws = u["work_start"] + g(0, 0.25)
                if pyr.random() < u["p_home_am"]:
                    stops.append((ws - pyr.uniform(0.6, 1.3), home))
                if pyr.random() < u["p_transit"]:
                    stops.append((ws - 0.4, u["fav"]["transit"][0]))
                if pyr.random() < u["p_coffee"]:
                    stops.append((ws - 0.2, choose(u, "coffee", work)))
                if pyr.random() < 0.92:
                    stops.append((ws, work))
                if pyr.random() < u["p_lunch"]:
                    stops.append((g(12.6, 0.45), choose(u, "lunch", work)))
                if pyr.random() < 0.15:
                    stops.append((g(15.5, 0.8), work if pyr.random() < 0.6 else choose(u, "coffee", work)))
                t = ws + g(9.0, 0.6)  # leaving work
                p_out = min(0.95, u["p_out"] * (1.5 if friday_ish else 1.0))
                if pyr.random() < p_out:
                    r = pyr.random()
                    if r < u["p_gym"]:
                        k = "gym"
                    else:
                        k = pyr.choices(("dinner", "bar", "shop", "grocery", "culture"),
                                        weights=(4, 2.5 + 3 * friday_ish, 1.2, 1.2, 0.6))[0]
                    t += pyr.uniform(0.3, 1.0)
                    stops.append((t, choose(u, k, work)))
                    if k == "dinner" and pyr.random() < u["p_bar"] * (2 if friday_ish else 1):
                        t += pyr.uniform(1.2, 2.2)
                        stops.append((t, choose(u, "bar", stops[-1][1])))
                    t += pyr.uniform(0.8, 2.0)
                else:
                    t += pyr.uniform(0.4, 1.2)
                if pyr.random() < u["p_home_pm"]:
                    stops.append((t, home))
            else:
                t = g(10.8, 1.0)  # weekend lie-in
                if pyr.random() < 0.4:
                    stops.append((t, home))
                if pyr.random() < 0.6:
                    t += pyr.uniform(0.3, 1.2)
                    stops.append((t, choose(u, "coffee" if pyr.random() < 0.4 else "dinner", home)))
                for _ in range(pyr.choice((1, 1, 2, 2, 3))):
                    k = pyr.choices(("park", "shop", "grocery", "culture", "gym", "coffee"),
                                    weights=(3, 2.5, 1.5, 1.5, 1 + 4 * u["p_gym"], 1))[0]
                    t = max(t, 12.5) + pyr.uniform(0.6, 2.2)
                    stops.append((t, choose(u, k, stops[-1][1] if stops else home)))
                if pyr.random() < 0.55:
                    t = max(t + 0.5, g(19.4, 0.8))
                    stops.append((t, choose(u, "dinner", stops[-1][1] if stops else home)))
                if pyr.random() < u["p_bar"] * 1.6:
                    t = max(t + 0.8, g(22.0, 0.9))
                    stops.append((t, choose(u, "bar", stops[-1][1] if stops else home)))
                if pyr.random() < 0.7:
                    stops.append((t + pyr.uniform(0.5, 1.5), home))
            if u["day_shift"] > 0 and stops:
                shift = _day_shift([hour for hour, _ in stops], u["day_shift"], g)
                stops = [(hour + shift, poi) for hour, poi in stops]
            if u["stop_jitter"] > 0 and stops:
                # Each stop's own deviation (an errand earlier, dinner later); stops may swap places. Kept
                # within 05:30-02:30 (two stops pushed to 02:30 at once lose the later, as any late day does).
                stops = sorted((min(max(hour + g(0, u["stop_jitter"]), 5.5), 26.5), poi) for hour, poi in stops)
            # Check-ins of one day keep their order and are at least ~8 minutes apart; nothing runs
            # past 02:30 so a day never overlaps the next one's morning.
            prev = -1.0
            for hour, poi in stops:
                hour = min(max(hour, prev + pyr.uniform(0.13, 0.4), 5.5), 26.5)
                if hour <= prev:
                    break
                prev = hour
                out_user.append(ui)
                out_poi.append(poi)
                out_sec.append(day * 86400 + int(hour * 3600) + pyr.randrange(60) - 30)

    # ---- assemble -------------------------------------------------------------------------------
    user_idx = np.asarray(out_user, dtype=np.int64)
    poi_idx = np.asarray(out_poi, dtype=np.int64)
    secs = np.asarray(out_sec, dtype=np.int64)
    if checkin_rate < 1:  # a generator of its own: the stops (and the rest of the city) stay those of rate 1
        kept = np.random.default_rng([seed, 1]).random(user_idx.size) < checkin_rate
        user_idx, poi_idx, secs = user_idx[kept], poi_idx[kept], secs[kept]
    local = start_day.astype("datetime64[us]") + secs.astype("timedelta64[s]")
    lat0, lon0 = center
    lat = lat0 + xy[:, 1] / _KM_PER_DEG_LAT
    lon = lon0 + xy[:, 0] / (_KM_PER_DEG_LAT * math.cos(math.radians(lat0)))
    # Foursquare-like 24-hex venue ids: random, made unique by the POI index in the tail.
    salt = rng.integers(0, 2**48, size=n_pois)
    poi_ids = np.array([f"{int(s):012x}{i:012x}" for i, s in enumerate(salt)], dtype=object)
    parents = np.array([CATEGORIES[str(c)][0] for c in category], dtype=object)
    offset = np.timedelta64(timezone_offset_min, "m")
    df = pl.DataFrame({
        "user_id": pl.Series([str(i + 1) for i in range(n_users)], dtype=pl.String)[user_idx],
        "poi_id": pl.Series(poi_ids[poi_idx].tolist(), dtype=pl.String),
        "utc_time": pl.Series(local - offset).dt.replace_time_zone("UTC"),
        "local_time": pl.Series(local),
        "lat": lat[poi_idx],
        "lon": lon[poi_idx],
        "category": pl.Series(category[poi_idx].tolist(), dtype=pl.String),
        "parent_category": pl.Series(parents[poi_idx].tolist(), dtype=pl.String),
        "name": pl.Series(names, dtype=pl.String)[poi_idx],
        "address": pl.Series(addresses, dtype=pl.String)[poi_idx],
    })
    return to_canonical(df.sort(["user_id", "utc_time", "poi_id"], maintain_order=True))
