"""Server-name normalisation: one canonical spelling per host name, or a clear refusal.

The proxy makes two decisions on the server name a client sends: whether policy allows it and
where to connect. Both must see the *same* string, and that string must be a DNS host name,
because bypasses live in the gaps between spellings (``Example.COM`` vs ``example.com``,
``example.com.`` vs ``example.com``, ``127.1`` that a resolver reads as an address). So every
name goes through :func:`normalize_sni` once, at the edge, and the rest of the code compares
plain strings.

The rules, and why:

* ASCII only. RFC 6066 section 3 says the ``HostName`` is "represented as a byte string using
  ASCII encoding without a trailing dot", with internationalised names sent as IDNA A-labels.
* Lower-cased (DNS is case-insensitive, our rule tables are not), and exactly one trailing dot
  stripped (clients should not send it, some do; two dots mean an empty label).
* Labels are LDH (letters, digits, hyphen), 1..63 bytes, no leading or trailing hyphen; the
  whole name is at most 253 bytes (RFC 1035 section 2.3.4, in presentation form). Underscores
  are refused: they are legal in some DNS records but never in a host name (RFC 952/1123).
* Labels starting with ``xn--`` must be valid A-labels: the Punycode must decode, re-encode to
  the same label, decode to something non-ASCII, and the result must be NFC-normalised, must
  not start with a combining mark, and must not contain control, format, separator, non-LDH
  ASCII or full-stop look-alike code points, nor any that case folding plus NFKC would change
  (upper case, compatibility characters; RFC 5892's exceptions such as "ß" are allowed). This
  is a practical subset of IDNA2008 (RFC 5891) that needs only the standard library; the
  stdlib ``idna`` codec is IDNA2003 and would refuse valid IDNA2008 names such as
  ``xn--fa-hia`` ("faß"). Symbols (emoji) are let through: browsers following UTS 46
  resolve such names, and they cannot make two spellings of one name. Other labels with
  hyphens in positions 3 and 4 are accepted: real names such as
  ``r3---sn-abc.googlevideo.com`` use them.
* IP literals are refused (RFC 6066: "Literal IPv4 and IPv6 addresses are not permitted"),
  including the numeric forms ``inet_aton`` accepts (``127.1``, ``0x7f.0.0.1``,
  ``2130706433``), bracketed IPv6 (``[::1]``), and any name whose last label is all digits
  (no top-level domain is numeric, RFC 3696 section 2, so a resolver may treat it as an
  address).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from typing import Final

from .errors import InvalidSNIError

__all__ = ["is_valid_hostname", "normalize_sni"]

# RFC 1035 2.3.4: 255 octets on the wire is 253 characters in dotted form without the root dot.
MAX_NAME_LENGTH: Final = 253
# RFC 1035 2.3.4: a label is at most 63 octets (the length byte's top two bits are flags).
MAX_LABEL_LENGTH: Final = 63
# How much of an offending name an error message quotes; a 64 KiB name in a log line helps no one.
_SHOW_LIMIT: Final = 80

_LDH_LABEL: Final = re.compile(r"[a-z0-9-]+")
_NOT_LDH: Final = re.compile(r"[^a-z0-9-]")
# One component of a number that inet_aton(3) accepts: decimal, octal (leading 0) or hex (0x).
_INET_ATON_PART: Final = re.compile(r"(0x[0-9a-f]*|[0-9]+)")
_ALL_DIGITS: Final = re.compile(r"[0-9]+")
_ACE_PREFIX: Final = "xn--"
# Code points that are ASCII but not LDH may not hide inside a U-label either.
_LDH_ASCII: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
# Code points IDNA2008 allows although case folding or NFKC would change them or they are
# format/punctuation characters: the exceptions of RFC 5892 2.6 (sharp s, final sigma, ...) and
# the CONTEXTJ/CONTEXTO ones (ZWNJ, ZWJ, middle dots, Hebrew geresh/gershayim, Greek keraia).
_IDNA_EXCEPTIONS: Final = frozenset(
    "\u00df\u03c2\u06fd\u06fe\u0f0b\u3007\u200c\u200d\u00b7\u0375\u05f3\u05f4\u30fb"
)
# Full stops that UTS 46 maps to "."; inside a label they would make a name that different
# software splits into labels differently.
_DOT_LOOKALIKES: Final = frozenset("\u3002\uff0e\uff61")


def _show(raw: bytes | str) -> str:
    """Quote a name for an error message: repr, cut to a readable length.

    ASCII bytes are shown as text (``'a_b.com'``, not ``b'a_b.com'``), so a name reads the same
    whether it came from a ClientHello or from configuration; other bytes keep their escapes.
    """
    shown: bytes | str = raw.decode("ascii") if isinstance(raw, bytes) and raw.isascii() else raw
    if len(shown) <= _SHOW_LIMIT:
        return repr(shown)
    unit = "bytes" if isinstance(shown, bytes) else "characters"
    return f"{shown[:_SHOW_LIMIT]!r}... ({len(shown)} {unit})"


def _invalid(raw: bytes | str, problem: str) -> InvalidSNIError:
    return InvalidSNIError(f"invalid server name {_show(raw)}: {problem}")


#: Every character an address literal can have before a ``%`` scope (IPv4, IPv6, bracketed, and
#: ``inet_aton``'s hexadecimal and octal forms).
_IP_LITERAL_CHARACTERS: Final = frozenset("0123456789abcdefABCDEFxX.:[]")


def _is_ip_literal(name: str) -> bool:
    """True for anything a resolver or ``inet_aton`` would read as an address, not a name."""
    if not _IP_LITERAL_CHARACTERS.issuperset(name.split("%", 1)[0]):
        return False  # most names: no exception from ipaddress to pay for
    candidate = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        ipaddress.ip_address(candidate.split("%", 1)[0])
    except ValueError:
        pass
    else:
        return True
    parts = name.split(".")
    return 1 <= len(parts) <= 4 and all(_INET_ATON_PART.fullmatch(p) for p in parts)


def _a_label_problem(label: str) -> str | None:
    """Why ``label`` (starting with ``xn--``) is not a valid IDNA A-label, or None if it is."""
    encoded = label[len(_ACE_PREFIX) :]
    try:
        ulabel = encoded.encode("ascii").decode("punycode")
    except (UnicodeError, ValueError, OverflowError, IndexError):
        return "its Punycode does not decode"
    try:
        canonical = ulabel.encode("punycode").decode("ascii")
    except (UnicodeError, ValueError, OverflowError, IndexError):
        return "its Punycode does not decode"
    if canonical != encoded:
        return "its Punycode is not in canonical form"
    if not ulabel or all(ord(c) < 0x80 for c in ulabel):
        return "it decodes to plain ASCII, which must not be Punycode-encoded"
    if unicodedata.normalize("NFC", ulabel) != ulabel:
        return "it decodes to a string that is not NFC-normalised"
    if unicodedata.category(ulabel[0]).startswith("M"):
        return "it decodes to a string starting with a combining mark"
    for char in ulabel:
        if ord(char) < 0x80:
            if char not in _LDH_ASCII:
                return f"it decodes to a string containing {char!r}"
            continue
        if char in _IDNA_EXCEPTIONS:
            continue
        category = unicodedata.category(char)
        if (
            category[0] in "CZ"
            or char in _DOT_LOOKALIKES
            # RFC 5892 "Unstable": a code point that case folding or NFKC changes (upper case,
            # compatibility forms such as U+2488 "1.") has another spelling, so it is refused.
            or unicodedata.normalize("NFKC", char.casefold()) != char
        ):
            return (
                f"it decodes to a string containing U+{ord(char):04X} ({category}), which "
                "IDNA2008 does not allow"
            )
    return None


def _a_label_hint(text: str) -> str:
    """The A-label spelling of a U-label name, for an error message's suggestion.

    Not IDNA2003 (``str.encode("idna")`` maps "ß" to "ss", which is a different name under
    IDNA2008); just NFC, lower case and Punycode per label.
    """
    labels = []
    for label in unicodedata.normalize("NFC", text).lower().split("."):
        if label.isascii():
            labels.append(label)
        else:
            labels.append(_ACE_PREFIX + label.encode("punycode").decode("ascii"))
    return ".".join(labels)


def normalize_sni(raw: bytes | str) -> str:
    """Return the canonical form of a server name, or raise if it is not a host name.

    Used on every SNI the proxy receives and on every name an operator writes in a rule, so
    that policy and routing compare the same spelling.

    Args:
        raw: the ``HostName`` bytes from the ClientHello, or a name from configuration.

    Returns:
        The lower-case name without a trailing dot, e.g. ``"www.example.com"``.

    Raises:
        InvalidSNIError: the name is empty, not ASCII, too long, has a bad label, or is an IP
            literal. The message quotes the name and says which rule it broke.
    """
    if isinstance(raw, bytes):
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise _invalid(
                raw, "it contains non-ASCII bytes; clients must send IDNA A-labels (xn--...)"
            ) from None
    else:
        text = raw
        if not text.isascii():
            raise _invalid(
                raw, f"it contains non-ASCII characters; write it as {_a_label_hint(text)!r}"
            )
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise _invalid(raw, "the name is empty")
    if _is_ip_literal(name):
        raise _invalid(raw, "IP address literals are not allowed as server names (RFC 6066)")
    if len(name) > MAX_NAME_LENGTH:
        raise _invalid(raw, f"the name is {len(name)} characters long, more than {MAX_NAME_LENGTH}")
    labels = name.split(".")
    for index, label in enumerate(labels, start=1):
        if not label:
            raise _invalid(raw, f"label {index} is empty")
        if len(label) > MAX_LABEL_LENGTH:
            raise _invalid(
                raw, f"label {index} is {len(label)} characters long, more than {MAX_LABEL_LENGTH}"
            )
        if not _LDH_LABEL.fullmatch(label):
            bad = _NOT_LDH.search(label)
            assert bad is not None  # a label that is not LDH has a non-LDH character
            raise _invalid(
                raw,
                f"label {label!r} contains {bad.group()!r}; only letters, digits and hyphens "
                "are allowed",
            )
        if label.startswith("-") or label.endswith("-"):
            raise _invalid(raw, f"label {label!r} starts or ends with a hyphen")
        if label.startswith(_ACE_PREFIX):
            problem = _a_label_problem(label)
            if problem is not None:
                raise _invalid(raw, f"label {label!r} is not a valid IDNA A-label: {problem}")
    if _ALL_DIGITS.fullmatch(labels[-1]):
        raise _invalid(
            raw, "the last label is all digits, so resolvers may read the name as an IP address"
        )
    return name


def is_valid_hostname(name: bytes | str) -> bool:
    """True if :func:`normalize_sni` accepts ``name`` (for validating names in configuration).

    Note that this accepts names that are not in canonical form (``Example.COM.``); compare the
    result of :func:`normalize_sni` when the canonical form matters.
    """
    try:
        normalize_sni(name)
    except InvalidSNIError:
        return False
    return True
