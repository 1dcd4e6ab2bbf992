"""Parent categories for Foursquare-style venue categories.

Raw TSMC2014 rows name only the leaf category ("Coffee Shop"); QT-Mob's descriptions also state the
parent ("Food"). Foursquare's top level has ten parents; this module maps a leaf to one of them by
exact names first and keywords second, and to ``"Other"`` when nothing matches. A dataset with its
own hierarchy (e.g. the Gowalla side file) keeps its own parents.
"""

from __future__ import annotations

import re

import polars as pl

PARENTS = (
    "Arts & Entertainment",
    "College & University",
    "Event",
    "Food",
    "Nightlife Spot",
    "Outdoors & Recreation",
    "Professional & Other Places",
    "Residence",
    "Shop & Service",
    "Travel & Transport",
)

# Leaf names whose keywords below would mislead ("Food & Drink Shop" is a shop, not food).
_EXACT = {
    "Food & Drink Shop": "Shop & Service",
    "Food Truck": "Food",
    "Gym / Fitness Center": "Outdoors & Recreation",
    "Gym": "Outdoors & Recreation",
    "Home (private)": "Residence",
    "Residential Building (Apartment / Condo)": "Residence",
    "Housing Development": "Residence",
    "Office": "Professional & Other Places",
    "Building": "Professional & Other Places",
    "Medical Center": "Professional & Other Places",
    "Post Office": "Professional & Other Places",
    "Hotel": "Travel & Transport",
    "Hotel Bar": "Nightlife Spot",
    "Strip Club": "Nightlife Spot",
    "Music Venue": "Arts & Entertainment",
    "Casino": "Arts & Entertainment",
    "Stadium": "Arts & Entertainment",
    "Bowling Alley": "Arts & Entertainment",
    "Arcade": "Arts & Entertainment",
    "Ice Cream Shop": "Food",
    "Coffee Shop": "Food",
    "Tea Room": "Food",
    "Cupcake Shop": "Food",
    "Donut Shop": "Food",
    "Bagel Shop": "Food",
    "Dessert Shop": "Food",
    "Snack Place": "Food",
    "Candy Store": "Shop & Service",
    "Wine Shop": "Shop & Service",
    "Student Center": "College & University",
    "Conference Room": "Professional & Other Places",
    "Convention Center": "Professional & Other Places",
}

# Checked in order; the first keyword found in the lower-cased leaf decides.
_KEYWORDS: tuple[tuple[str, str], ...] = (
    # Multi-word and ambiguous leaves first.
    ("college", "College & University"), ("trade school", "College & University"), ("law school", "College & University"),
    ("medical school", "College & University"), ("gas station", "Shop & Service"), ("police station", "Professional & Other Places"),
    ("jazz club", "Arts & Entertainment"), ("comedy club", "Arts & Entertainment"), ("juice bar", "Food"),
    ("theme park", "Arts & Entertainment"), ("event space", "Professional & Other Places"),
    ("internet cafe", "Shop & Service"), ("historic site", "Arts & Entertainment"), ("hot spring", "Outdoors & Recreation"),
    ("dog run", "Outdoors & Recreation"), ("surf spot", "Outdoors & Recreation"), ("track", "Outdoors & Recreation"),
    ("tattoo", "Shop & Service"), ("emergency room", "Professional & Other Places"), ("winery", "Professional & Other Places"),
    ("fire station", "Professional & Other Places"), ("post office", "Professional & Other Places"),
    ("college bookstore", "College & University"), ("martial arts", "Outdoors & Recreation"),
    ("beer garden", "Nightlife Spot"), ("rock club", "Arts & Entertainment"), ("pool hall", "Arts & Entertainment"),
    ("rest area", "Travel & Transport"), ("roof deck", "Travel & Transport"), ("dance studio", "Arts & Entertainment"),
    ("design studio", "Shop & Service"), ("meeting room", "Professional & Other Places"),
    ("coworking", "Professional & Other Places"), ("high school", "Professional & Other Places"),
    ("middle school", "Professional & Other Places"), ("elementary school", "Professional & Other Places"),
    ("stadium", "Arts & Entertainment"), ("nightclub", "Nightlife Spot"), ("opera", "Arts & Entertainment"),
    ("multiplex", "Arts & Entertainment"), ("racetrack", "Arts & Entertainment"), ("skating", "Outdoors & Recreation"),
    ("cafeteria", "Food"), ("plane", "Travel & Transport"), ("bridge", "Outdoors & Recreation"),
    ("store", "Shop & Service"), ("shop", "Shop & Service"), ("bookstore", "Shop & Service"),
    ("barbershop", "Shop & Service"), ("salon", "Shop & Service"), ("startup", "Professional & Other Places"),
    ("college", "College & University"), ("university", "College & University"),
    ("academic", "College & University"),
    ("campus", "College & University"), ("dorm", "College & University"),
    ("fraternity", "College & University"), ("sorority", "College & University"),
    ("restaurant", "Food"), ("café", "Food"), ("cafe", "Food"), ("diner", "Food"), ("pizza", "Food"),
    ("burger", "Food"), ("bakery", "Food"), ("sandwich", "Food"), ("joint", "Food"), ("steakhouse", "Food"),
    ("breakfast", "Food"), ("food", "Food"), ("deli", "Food"), ("bodega", "Food"), ("taco", "Food"),
    ("burrito", "Food"), ("sushi", "Food"), ("noodle", "Food"), ("bbq", "Food"), ("fried chicken", "Food"),
    ("salad", "Food"), ("soup", "Food"), ("dumpling", "Food"), ("bistro", "Food"), ("gastropub", "Food"),
    ("bar", "Nightlife Spot"), ("pub", "Nightlife Spot"), ("lounge", "Nightlife Spot"), ("club", "Nightlife Spot"),
    ("nightlife", "Nightlife Spot"), ("brewery", "Nightlife Spot"), ("speakeasy", "Nightlife Spot"),
    ("airport", "Travel & Transport"), ("station", "Travel & Transport"), ("subway", "Travel & Transport"),
    ("train", "Travel & Transport"), ("bus", "Travel & Transport"), ("taxi", "Travel & Transport"),
    ("ferry", "Travel & Transport"), ("road", "Travel & Transport"), ("travel", "Travel & Transport"),
    ("hotel", "Travel & Transport"), ("motel", "Travel & Transport"), ("hostel", "Travel & Transport"),
    ("rental", "Travel & Transport"), ("bridge", "Travel & Transport"), ("tunnel", "Travel & Transport"),
    ("parking", "Travel & Transport"), ("light rail", "Travel & Transport"), ("platform", "Travel & Transport"),
    ("park", "Outdoors & Recreation"), ("beach", "Outdoors & Recreation"), ("gym", "Outdoors & Recreation"),
    ("playground", "Outdoors & Recreation"), ("garden", "Outdoors & Recreation"), ("plaza", "Outdoors & Recreation"),
    ("trail", "Outdoors & Recreation"), ("field", "Outdoors & Recreation"), ("pool", "Outdoors & Recreation"),
    ("court", "Outdoors & Recreation"), ("outdoors", "Outdoors & Recreation"), ("yoga", "Outdoors & Recreation"),
    ("athletic", "Outdoors & Recreation"), ("sport", "Outdoors & Recreation"), ("river", "Outdoors & Recreation"),
    ("lake", "Outdoors & Recreation"), ("harbor", "Outdoors & Recreation"), ("marina", "Outdoors & Recreation"),
    ("scenic", "Outdoors & Recreation"), ("neighborhood", "Outdoors & Recreation"), ("pier", "Outdoors & Recreation"),
    ("restaurants", "Food"), ("bars", "Nightlife Spot"), ("arts", "Arts & Entertainment"),
    ("museum", "Arts & Entertainment"), ("theater", "Arts & Entertainment"), ("cinema", "Arts & Entertainment"),
    ("movie", "Arts & Entertainment"), ("gallery", "Arts & Entertainment"), ("art", "Arts & Entertainment"),
    ("entertainment", "Arts & Entertainment"), ("zoo", "Arts & Entertainment"), ("aquarium", "Arts & Entertainment"),
    ("concert", "Arts & Entertainment"), ("comedy", "Arts & Entertainment"), ("performing", "Arts & Entertainment"),
    ("event", "Event"), ("festival", "Event"), ("parade", "Event"), ("conference", "Event"),
    ("home", "Residence"), ("residential", "Residence"), ("apartment", "Residence"), ("residence", "Residence"),
    ("store", "Shop & Service"), ("shop", "Shop & Service"), ("market", "Shop & Service"), ("mall", "Shop & Service"),
    ("boutique", "Shop & Service"), ("salon", "Shop & Service"), ("spa", "Shop & Service"), ("barbershop", "Shop & Service"),
    ("bank", "Shop & Service"), ("laundry", "Shop & Service"), ("pharmacy", "Shop & Service"), ("service", "Shop & Service"),
    ("dealership", "Shop & Service"), ("post office", "Shop & Service"),
    ("office", "Professional & Other Places"), ("building", "Professional & Other Places"),
    ("church", "Professional & Other Places"), ("temple", "Professional & Other Places"),
    ("synagogue", "Professional & Other Places"), ("mosque", "Professional & Other Places"),
    ("hospital", "Professional & Other Places"), ("doctor", "Professional & Other Places"),
    ("dentist", "Professional & Other Places"), ("library", "Professional & Other Places"),
    ("government", "Professional & Other Places"), ("city hall", "Professional & Other Places"),
    ("courthouse", "Professional & Other Places"), ("police", "Professional & Other Places"),
    ("fire station", "Professional & Other Places"), ("factory", "Professional & Other Places"),
    ("school", "Professional & Other Places"), ("spiritual", "Professional & Other Places"),
    ("medical", "Professional & Other Places"), ("military", "Professional & Other Places"),
    ("cemetery", "Outdoors & Recreation"),
)


def parent_of(category: str | None) -> str | None:
    """Parent category of a Foursquare leaf category (``None`` for a missing leaf)."""
    if category is None or category == "":
        return None
    if category in _EXACT:
        return _EXACT[category]
    if category in PARENTS:
        return category
    words = re.sub(r"[^\w&]+", " ", category.lower()).split()
    text = " " + " ".join(words) + " "
    for keyword, parent in _KEYWORDS:
        # Whole words only: "bar" must not match "Barbershop", nor "art" "Tech Startup".
        if f" {keyword} " in text:
            return parent
    return "Other"


def fill_parent_categories(df: pl.DataFrame) -> pl.DataFrame:
    """Fill a null ``parent_category`` from ``category`` with :func:`parent_of`."""
    leaves = df["category"].drop_nulls().unique().to_list()
    mapping = {leaf: parent_of(leaf) for leaf in leaves}
    return df.with_columns(
        parent_category=pl.coalesce(
            "parent_category", pl.col("category").replace_strict(mapping, default=None, return_dtype=pl.String)
        )
    )
