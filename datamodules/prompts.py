"""The words of QT-Mob's samples: the system prompt, each task's templates, the response prefixes and
how a visit is written. :mod:`datamodules.samples` picks a template per sample; :mod:`datamodules.rendering`
fills them in."""

from __future__ import annotations

MASK, UNKNOWN = "[MASK]", "[UNKNOWN]"

SYSTEM_PROMPT = (
    "You are a helpful assistant that predicts human mobility in a city. Every place (POI) is written "
    "as a POI index: a few special tokens that encode where it is and what it is."
)

# Templates use {name} placeholders; see _template_expr. Evaluation always uses template 0. The
# official code has one next-location wording, so by default (``next_paraphrases: false``) training
# uses template 0 too; the other tasks draw among their wordings, as the official code does.
TEMPLATES: dict[str, list[str]] = {
    "next": [
        "{profile}Here is the current trajectory of user {user}: {history} "
        "Given this trajectory, which POI index will user {user} visit at {time}?",
        "{profile}User {user} has made these visits so far today: {history} "
        "At {time}, where will user {user} go next? Answer with a POI index.",
        "{profile}Trajectory of user {user}: {history} Predict the POI index user {user} visits at {time}.",
    ],
    "recovery_multi": [
        "{profile}Here is a trajectory of user {user} in which some visits are hidden as [MASK]: {visits} "
        "Recover the missing POI indices and output the complete trajectory.",
        "{profile}Some POI indices of this trajectory of user {user} are missing ([MASK]): {visits} "
        "Fill them in and write out the whole trajectory.",
    ],
    "recovery_single": [
        "{profile}Here is a trajectory of user {user}: {visits} One visit is missing ([MASK]) and others "
        "are unknown ([UNKNOWN]). Which POI index is the missing one (not an unknown one)?",
        "{profile}In this trajectory of user {user}, [MASK] marks the visit to recover and [UNKNOWN] marks "
        "visits that are unknown: {visits} What is the POI index at [MASK]?",
    ],
    "index2loc": [
        "What do you know about the place with POI index {code}?",
        "Describe the location, category and surroundings of POI index {code}.",
        "Where is POI index {code} and what kind of place is it?",
    ],
    "loc2index": [
        "{description}\nWhich POI index does this place have?",
        "{description}\nGive the POI index of the place described above.",
    ],
    "translation": [
        "Here is a description of a trajectory of user {user}:\n{blocks}\n"
        "Translate it into the sequence of POI indices.",
        "User {user}'s visits are described as follows:\n{blocks}\nConvert them into POI indices.",
    ],
}
# data.samples.next_format=continuation|trajectory: the visits are the assistant's turn, so the location of
# visit k is predicted from exactly the text that precedes it in the whole trajectory.
CONTINUATION_PROMPT = "{profile}Write the visits of user {user} in time order, each with the POI index of the place visited."

RESPONSE_PREFIX = {
    "next": "At time {time}, user {user} will visit POI index ",
    "recovery_multi": "",
    "recovery_single": "At time {time}, user {user} visited POI index ",
    "index2loc": "",
    "loc2index": "The POI index of this place is ",
    "translation": "",
}

# data.samples.visit_text: (strftime format of a visit's time, the visit sentence with {time} {user} {code}).
VISIT_TEXT = {
    "official": ("%Y-%m-%d %H:%M:%S", "At time {time}, user {user} visited POI index {code}."),
    "compact": ("%a %H:%M", "{time} {code}."),
}
