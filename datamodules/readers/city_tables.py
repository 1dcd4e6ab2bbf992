"""The tables the synthetic city is drawn from: Foursquare-like categories with their parents and
activity kinds, neighbourhood types and the words of place names (datamodules/readers/synthetic.py)."""

from __future__ import annotations

# Leaf category -> (parent category, activity kind, relative frequency within its kind).
# The *kind* is what the mobility routine asks for ("somewhere to have lunch"); the leaf is what
# the POI is called. Parents follow Foursquare's top-level taxonomy.
CATEGORIES: dict[str, tuple[str, str, float]] = {
    "Home (private)": ("Residence", "home", 1.0),
    "Residential Building (Apartment / Condo)": ("Residence", "home", 1.2),
    "Office": ("Professional & Other Places", "work", 3.0),
    "Building": ("Professional & Other Places", "work", 1.0),
    "Tech Startup": ("Professional & Other Places", "work", 0.6),
    "Medical Center": ("Professional & Other Places", "work", 0.5),
    "College Academic Building": ("College & University", "college", 2.0),
    "University": ("College & University", "college", 1.0),
    "College Library": ("College & University", "college", 0.6),
    "Coffee Shop": ("Food", "coffee", 3.0),
    "Café": ("Food", "coffee", 1.0),
    "Bakery": ("Food", "coffee", 0.6),
    "Deli / Bodega": ("Food", "lunch", 2.0),
    "Sandwich Place": ("Food", "lunch", 1.5),
    "Fast Food Restaurant": ("Food", "lunch", 1.0),
    "Pizza Place": ("Food", "dinner", 1.5),
    "American Restaurant": ("Food", "dinner", 1.5),
    "Italian Restaurant": ("Food", "dinner", 1.0),
    "Chinese Restaurant": ("Food", "dinner", 1.0),
    "Mexican Restaurant": ("Food", "dinner", 1.0),
    "Sushi Restaurant": ("Food", "dinner", 0.7),
    "Burger Joint": ("Food", "dinner", 0.8),
    "Bar": ("Nightlife Spot", "bar", 3.0),
    "Pub": ("Nightlife Spot", "bar", 1.0),
    "Cocktail Bar": ("Nightlife Spot", "bar", 0.8),
    "Nightclub": ("Nightlife Spot", "bar", 0.5),
    "Grocery Store": ("Shop & Service", "grocery", 1.0),
    "Clothing Store": ("Shop & Service", "shop", 1.0),
    "Drugstore / Pharmacy": ("Shop & Service", "shop", 1.0),
    "Electronics Store": ("Shop & Service", "shop", 0.5),
    "Bookstore": ("Shop & Service", "shop", 0.5),
    "Salon / Barbershop": ("Shop & Service", "shop", 0.6),
    "Gym / Fitness Center": ("Outdoors & Recreation", "gym", 1.0),
    "Park": ("Outdoors & Recreation", "park", 2.0),
    "Plaza": ("Outdoors & Recreation", "park", 0.8),
    "Movie Theater": ("Arts & Entertainment", "culture", 1.0),
    "Museum": ("Arts & Entertainment", "culture", 0.8),
    "Music Venue": ("Arts & Entertainment", "culture", 0.7),
    "Theater": ("Arts & Entertainment", "culture", 0.6),
    "Subway": ("Travel & Transport", "transit", 2.0),
    "Train Station": ("Travel & Transport", "transit", 0.6),
}

KINDS: tuple[str, ...] = (
    "home", "work", "college", "coffee", "lunch", "dinner", "bar",
    "grocery", "shop", "gym", "park", "culture", "transit",
)

# Neighbourhood type -> (kind -> share of its POIs, spatial spread in units of radius_km,
# relative size). The mixes are what ties category to location.
HOOD_TYPES: dict[str, tuple[dict[str, float], float, float]] = {
    "business": (
        {"work": 0.36, "coffee": 0.15, "lunch": 0.18, "dinner": 0.06, "bar": 0.04, "shop": 0.05,
         "gym": 0.04, "transit": 0.08, "home": 0.02, "culture": 0.02},
        0.07, 1.0,
    ),
    "residential": (
        {"home": 0.42, "grocery": 0.09, "coffee": 0.08, "dinner": 0.10, "lunch": 0.04, "park": 0.08,
         "gym": 0.05, "shop": 0.06, "transit": 0.05, "bar": 0.03},
        0.11, 1.3,
    ),
    "nightlife": (
        {"bar": 0.36, "dinner": 0.22, "culture": 0.12, "coffee": 0.05, "home": 0.10, "shop": 0.05,
         "transit": 0.05, "lunch": 0.05},
        0.08, 0.9,
    ),
    "campus": (
        {"college": 0.32, "coffee": 0.12, "lunch": 0.14, "home": 0.14, "bar": 0.07, "culture": 0.05,
         "park": 0.05, "shop": 0.05, "transit": 0.06},
        0.08, 0.8,
    ),
    "leisure": (
        {"park": 0.26, "culture": 0.20, "shop": 0.20, "dinner": 0.10, "coffee": 0.08, "home": 0.10,
         "gym": 0.04, "transit": 0.02},
        0.10, 0.9,
    ),
}
# Order in which neighbourhood types are allotted: the first four give every city at least one
# place to live, work, study and go out; later ones repeat the commonest types.
HOOD_ORDER = ("business", "residential", "nightlife", "campus", "residential", "leisure",
               "business", "residential", "nightlife", "leisure", "business", "residential")

NAME_WORDS = (
    "Maple", "Hudson", "Union", "Bleecker", "Chelsea", "Liberty", "Empire", "Greenwich", "Bowery",
    "Astor", "Harbor", "Lenox", "Madison", "Park Slope", "Riverside", "Gramercy", "Canal", "Delancey",
    "Mercer", "Orchard", "Prospect", "Sunset", "Golden", "Blue Door", "Red Brick", "Corner", "Little",
    "Grand", "Central", "Eastside", "Westside", "Midtown", "Village", "Iron", "Copper", "Brooklyn",
    "Lucky", "Silver", "Linden", "Juniper",
)
# Category -> nouns used in names where the category name itself would read oddly.
NAME_NOUNS: dict[str, tuple[str, ...]] = {
    "Home (private)": ("Home",),
    "Residential Building (Apartment / Condo)": ("Apartments", "Residences", "Towers", "Lofts"),
    "Office": ("Partners", "Capital", "Group", "Associates", "Media", "Consulting"),
    "Building": ("Building", "Plaza Tower", "Center"),
    "Tech Startup": ("Labs", "Digital", "Systems"),
    "Medical Center": ("Medical Center", "Health"),
    "College Academic Building": ("Hall", "Academic Building"),
    "University": ("University", "College"),
    "College Library": ("Library",),
    "Deli / Bodega": ("Deli", "Bodega"),
    "Drugstore / Pharmacy": ("Pharmacy", "Drugs"),
    "Salon / Barbershop": ("Salon", "Barbershop"),
    "Gym / Fitness Center": ("Fitness", "Gym", "Athletic Club"),
}
