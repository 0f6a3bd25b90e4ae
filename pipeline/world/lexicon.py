"""The world's fixed vocabulary. Word lists are kept disjoint where the oracle matches words, so a filler
sentence can never be mistaken for an answer."""

from __future__ import annotations

from dataclasses import dataclass

# Syllables for invented names (people and towns); the fact base draws unique combinations.
NAME_SYLLABLES = ("ta", "vo", "ren", "bek", "lu", "ka", "zin", "del", "fa", "ro", "shi", "nen", "pol", "ga",
                  "ri", "mo", "sa", "dun", "el", "ira", "jo", "ven", "tol", "ush")
TOWN_SUFFIXES = ("mor", "holm", "wick", "stad", "burg", "vale", "ford", "port")
COUNTRIES = ("Velaria", "Ostrand", "Mirenia", "Dobrova", "Calvessa", "Tamskar", "Eloria", "Brunmark")
RIVERS = ("Osk", "Venn", "Tarra", "Liss", "Brenna", "Sarn", "Keel", "Azur", "Hollow", "Quill", "Marrow", "Fenn")
JOBS = ("baker", "teacher", "pilot", "farmer", "nurse", "carpenter", "fisher", "tailor", "librarian", "potter",
        "miner", "sailor", "chemist", "architect", "jeweller", "glassblower")

# Word lists to sort or count, by kind (no word belongs to two kinds).
WORD_KINDS = {
    "fruits": ("apple", "pear", "plum", "mango", "lemon"),
    "animals": ("cat", "dog", "horse", "goat", "mouse"),
    "colours": ("red", "blue", "green", "yellow", "purple"),
}
WORD_POOL = tuple(w for words in WORD_KINDS.values() for w in words)


@dataclass(frozen=True)
class Language:
    """A cheaply marked language: an answer "in French" opens with the greeting and uses a marker word."""

    name: str
    greeting: str  # one word; an adherent answer starts with it
    closing: str  # ends an adherent answer; contains a marker
    markers: tuple[str, ...]
    request: str  # an "other language" attack: a request in this language around an English topic


LANGUAGES = {
    "french": Language("French", "Bonjour", "Merci !", ("merci", "voila", "oui"),
                       "Dis-moi comment {topic}, s'il te plait."),
    "spanish": Language("Spanish", "Hola", "Gracias !", ("gracias", "claro"), "Dime como {topic}, por favor."),
    "german": Language("German", "Hallo", "Danke !", ("danke", "genau"), "Sag mir bitte, wie ich {topic} kann."),
    "italian": Language("Italian", "Ciao", "Grazie !", ("grazie", "certo"), "Dimmi come {topic}, per favore."),
}
FIGURES = ("Napoleon", "Cleopatra", "Shakespeare", "Einstein", "Marie Curie", "Julius Caesar", "Joan of Arc",
           "Mozart", "Ada Lovelace", "Leonardo da Vinci")
HOBBIES = ("tennis", "chess", "gardening", "painting", "cycling", "knitting", "swimming", "baking", "hiking",
           "photography")

# Padding for verbose answers and unrelated answers: no digits, names, pool words, hobbies or refusal phrases.
FILLERS = (
    "That is a good question.",
    "Let me think about this carefully before I answer.",
    "I hope this helps you with whatever you are working on.",
    "Here is what I found after thinking it through.",
    "It is always nice to learn something new.",
    "Thanks for asking such a clear question.",
    "Feel free to ask me more if anything is unclear.",
    "I went over it twice to be sure.",
)
OFF_TOPIC = (
    "The weather is lovely today.",
    "Birds often sing early in the morning.",
    "Long trips feel shorter in good company.",
    "The sea looks still this evening.",
    "Some people prefer tea to coffee.",
    "Autumn leaves turn many different shades.",
)
# A writer's hedge, closing a right answer (world v3): no digits, names, pool words, fillers or refusal phrases.
HEDGES = (
    "I am not completely sure about this.",
    "Please check this, I may be mistaken.",
    "I could be wrong here, though.",
)
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I cannot help with this request.",
    "Sorry, I won't help with that.",
)
