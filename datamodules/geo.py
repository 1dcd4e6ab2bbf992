"""Small geographic helpers: haversine distances, geohash, unit-sphere coordinates for KD-trees."""

from __future__ import annotations

import numpy as np

EARTH_RADIUS_KM = 6371.0088
_BASE32 = "0123456789bcdefghjkmnpqrstuvwxyz"


def haversine_km(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    """Great-circle distance in km (broadcasting over numpy arrays)."""
    lat1, lon1, lat2, lon2 = (np.radians(np.asarray(a, dtype=np.float64)) for a in (lat1, lon1, lat2, lon2))
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def unit_xyz(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Points on the unit sphere, shape (n, 3): Euclidean chords there are monotone in great-circle
    distance, so a KD-tree over them answers nearest-neighbour and radius queries exactly."""
    lat, lon = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


def km_to_chord(km: float) -> float:
    """Chord length on the unit sphere of a great-circle distance in km."""
    return 2 * np.sin(km / (2 * EARTH_RADIUS_KM))


def geohash(lat: np.ndarray, lon: np.ndarray, precision: int = 12) -> list[str]:
    """Vectorised geohash encoding (standard base-32 alphabet).

    Args:
        lat: Latitudes in degrees.
        lon: Longitudes in degrees.
        precision: Characters per hash (12 ≈ 4 cm).

    Returns:
        One geohash string per point.
    """
    lat = np.asarray(lat, dtype=np.float64).copy()
    lon = np.asarray(lon, dtype=np.float64).copy()
    lat_lo, lat_hi = np.full_like(lat, -90.0), np.full_like(lat, 90.0)
    lon_lo, lon_hi = np.full_like(lon, -180.0), np.full_like(lon, 180.0)
    chars = np.zeros((lat.size, precision), dtype=np.int64)
    even = True  # geohash interleaves bits starting with longitude
    for bit in range(precision * 5):
        if even:
            mid = (lon_lo + lon_hi) / 2
            b = lon >= mid
            lon_lo = np.where(b, mid, lon_lo)
            lon_hi = np.where(b, lon_hi, mid)
        else:
            mid = (lat_lo + lat_hi) / 2
            b = lat >= mid
            lat_lo = np.where(b, mid, lat_lo)
            lat_hi = np.where(b, lat_hi, mid)
        chars[:, bit // 5] = (chars[:, bit // 5] << 1) | b
        even = not even
    return ["".join(_BASE32[c] for c in row) for row in chars]
