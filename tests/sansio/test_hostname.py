"""normalize_sni: one spelling per host name, and an exact reason for every refusal."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_sni.sansio.errors import InvalidSNIError
from trio_sni.sansio.hostname import is_valid_hostname, normalize_sni


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("example.com", "example.com"),
        (b"example.com", "example.com"),
        ("EXAMPLE.com", "example.com"),
        ("Www.Example.Com", "www.example.com"),
        ("example.com.", "example.com"),  # one trailing dot is stripped
        (b"EXAMPLE.COM.", "example.com"),
        ("localhost", "localhost"),
        ("a", "a"),
        ("a-b.c-d.example", "a-b.c-d.example"),
        ("0.example", "0.example"),
        ("123.example.com", "123.example.com"),  # numeric labels are fine, just not the last
        ("r3---sn-abc.googlevideo.com", "r3---sn-abc.googlevideo.com"),  # hyphens at 3-4
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),  # bücher
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("xn--fa-hia.de", "xn--fa-hia.de"),  # faß: IDNA2008, which the stdlib idna codec refuses
        ("xn--i-7iq.ws", "xn--i-7iq.ws"),  # an emoji label, resolvable under UTS 46
        ("a" * 63 + ".example", "a" * 63 + ".example"),
        (".".join(["a" * 63] * 3 + ["a" * 61]), ".".join(["a" * 63] * 3 + ["a" * 61])),  # 253
        (".".join(["a" * 63] * 3 + ["a" * 61]) + ".", ".".join(["a" * 63] * 3 + ["a" * 61])),
    ],
)
def test_valid(raw: bytes | str, expected: str) -> None:
    assert normalize_sni(raw) == expected
    assert is_valid_hostname(raw)


IP_LITERAL = "IP address literals are not allowed as server names (RFC 6066)"
ALL_DIGITS = "the last label is all digits, so resolvers may read the name as an IP address"
NOT_LDH = "only letters, digits and hyphens are allowed"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("", "the name is empty"),
        (".", "the name is empty"),
        ("example.com..", "label 3 is empty"),
        ("a..b", "label 2 is empty"),
        (".example.com", "label 1 is empty"),
        ("1.2.3.4", IP_LITERAL),
        ("1.2.3.4.", IP_LITERAL),
        ("255.255.255.255", IP_LITERAL),
        ("::1", IP_LITERAL),
        ("[::1]", IP_LITERAL),
        ("[2001:db8::1]", IP_LITERAL),
        ("2001:DB8::1", IP_LITERAL),
        ("fe80::1%eth0", IP_LITERAL),
        ("::ffff:127.0.0.1", IP_LITERAL),
        ("127.1", IP_LITERAL),  # inet_aton forms
        ("0x7f.0.0.1", IP_LITERAL),
        ("0177.0.0.1", IP_LITERAL),
        ("2130706433", IP_LITERAL),
        ("1.2.3.4.5", ALL_DIGITS),
        ("example.123", ALL_DIGITS),
        ("a_b.example", "label 'a_b' contains '_'; " + NOT_LDH),
        ("_dmarc.example", "label '_dmarc' contains '_'; " + NOT_LDH),
        ("a b.example", "label 'a b' contains ' '; " + NOT_LDH),
        ("*.example", "label '*' contains '*'; " + NOT_LDH),
        ("ex/ample.com", "label 'ex/ample' contains '/'; " + NOT_LDH),
        ("-a.example", "label '-a' starts or ends with a hyphen"),
        ("a-.example", "label 'a-' starts or ends with a hyphen"),
        ("example.com-", "label 'com-' starts or ends with a hyphen"),
        ("a" * 64 + ".example", "label 1 is 64 characters long, more than 63"),
        (
            "xn--zz.example",
            "label 'xn--zz' is not a valid IDNA A-label: its Punycode does not decode",
        ),
        (
            "xn--abc.example",  # decodes to C1 control characters
            "label 'xn--abc' is not a valid IDNA A-label: it decodes to a string containing "
            "U+0082 (Cc), which IDNA2008 does not allow",
        ),
        (
            "xn--abc-.example",
            "label 'xn--abc-' starts or ends with a hyphen",
        ),
        (
            "xn--ab-.example",  # decodes to "ab": ASCII must not be encoded
            "label 'xn--ab-' starts or ends with a hyphen",
        ),
        (
            "xn--a-ecp.example",  # "a" + U+2488 DIGIT ONE FULL STOP, which NFKC makes "1."
            "label 'xn--a-ecp' is not a valid IDNA A-label: it decodes to a string containing "
            "U+2488 (No), which IDNA2008 does not allow",
        ),
        (
            "xn--a-6da.example",  # "aÄ": upper case inside a U-label
            "label 'xn--a-6da' is not a valid IDNA A-label: it decodes to a string containing "
            "U+00C4 (Lu), which IDNA2008 does not allow",
        ),
        (
            "xn--ab-r13a.example",  # "a。b": an ideographic full stop inside a label
            "label 'xn--ab-r13a' is not a valid IDNA A-label: it decodes to a string containing "
            "U+3002 (Po), which IDNA2008 does not allow",
        ),
        (
            "xn--a-wbb.example",  # COMBINING ACUTE ACCENT + "a"
            "label 'xn--a-wbb' is not a valid IDNA A-label: it decodes to a string starting "
            "with a combining mark",
        ),
    ],
)
def test_invalid(raw: str, problem: str) -> None:
    with pytest.raises(InvalidSNIError) as info:
        normalize_sni(raw)
    assert str(info.value) == f"invalid server name {raw!r}: {problem}"
    assert not is_valid_hostname(raw)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (
            "xn--bcher-kva-.example",
            "label 'xn--bcher-kva-' starts or ends with a hyphen",
        ),
        (
            "xn--a-ecp1.example",
            "label 'xn--a-ecp1' is not a valid IDNA A-label: its Punycode does not decode",
        ),
    ],
)
def test_invalid_a_labels(raw: str, problem: str) -> None:
    with pytest.raises(InvalidSNIError, match=r"^invalid server name ") as info:
        normalize_sni(raw)
    assert str(info.value) == f"invalid server name {raw!r}: {problem}"


def test_a_label_not_nfc() -> None:
    # The NFD form of "é" (e + COMBINING ACUTE ACCENT): a different A-label for the same
    # name as the NFC "é", so only the NFC one is accepted.
    nfd = "xn--" + "e\u0301".encode("punycode").decode("ascii")
    with pytest.raises(InvalidSNIError) as info:
        normalize_sni(nfd + ".example")
    assert str(info.value) == (
        f"invalid server name {nfd + '.example'!r}: label {nfd!r} is not a valid IDNA "
        "A-label: it decodes to a string that is not NFC-normalised"
    )


def test_too_long_name_is_quoted_shortened() -> None:
    name = ".".join(["a" * 63] * 4)  # 255 characters
    with pytest.raises(InvalidSNIError) as info:
        normalize_sni(name)
    assert str(info.value) == (
        f"invalid server name {name[:80]!r}... (255 characters): the name is 255 characters "
        "long, more than 253"
    )


def test_non_ascii_bytes() -> None:
    with pytest.raises(InvalidSNIError) as info:
        normalize_sni("bücher.example".encode())
    assert str(info.value) == (
        "invalid server name b'b\\xc3\\xbccher.example': it contains non-ASCII bytes; clients "
        "must send IDNA A-labels (xn--...)"
    )


@pytest.mark.parametrize(
    ("raw", "a_label"),
    [
        ("bücher.example", "xn--bcher-kva.example"),
        ("Bücher.Example", "xn--bcher-kva.example"),
        ("faß.de", "xn--fa-hia.de"),
    ],
)
def test_non_ascii_text_suggests_the_a_label(raw: str, a_label: str) -> None:
    with pytest.raises(InvalidSNIError) as info:
        normalize_sni(raw)
    assert str(info.value) == (
        f"invalid server name {raw!r}: it contains non-ASCII characters; write it as {a_label!r}"
    )
    assert normalize_sni(a_label) == a_label


def test_ascii_bytes_are_quoted_as_text() -> None:
    with pytest.raises(InvalidSNIError) as info:
        normalize_sni(b"a_b.example")
    assert str(info.value).startswith("invalid server name 'a_b.example': ")


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_only_invalid_sni_errors(raw: bytes | str) -> None:
    try:
        name = normalize_sni(raw)
    except InvalidSNIError:
        return
    # What comes out is canonical: a fixed point, lower case, no trailing dot, in bounds.
    assert normalize_sni(name) == name
    assert name == name.lower()
    assert not name.endswith(".")
    assert 1 <= len(name) <= 253


@given(st.lists(st.from_regex(r"xn--[a-z0-9-]{1,20}", fullmatch=True), min_size=1, max_size=3))
def test_random_a_labels_never_crash(labels: list[str]) -> None:
    name = ".".join([*labels, "example"])
    assert is_valid_hostname(name) in (True, False)
