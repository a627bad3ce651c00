"""JSON Schema string formats as regexes over the string's characters, for a backend that
enforces a ``format`` as a pattern: each matches only values the format allows (and that
``jsonschema``'s format checkers accept), a common subset of each rather than all of it: dates
leave out February 29, times and date-times carry a UTC offset and at most 9 fraction digits,
e-mail addresses and URIs their everyday shapes. None needs escaping inside a JSON string.
"""

from __future__ import annotations

_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
# Days that every year has in each month (February 29 left out).
_DATE = r"[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "ipv4": rf"{_OCTET}(?:\.{_OCTET}){{3}}",
    "hostname": rf"{_LABEL}(?:\.{_LABEL})*",
    "email": rf"[a-zA-Z0-9._%+-]{{1,64}}@{_LABEL}(?:\.{_LABEL})*\.[a-zA-Z]{{2,24}}",
    "uri": rf"https?://{_LABEL}(?:\.{_LABEL})*(?:/[a-zA-Z0-9._~%-]*)*",
}
