"""Domain rules and client lists: the rule table, label-boundary traps, and a reference model."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_sni.sansio.config import Action, Clients, Config, Rule
from trio_sni.sansio.config_load import load_config
from trio_sni.sansio.policy import Deny, Policy, Route


def make_policy(*rules: Rule, clients: Clients | None = None) -> Policy:
    config = Config(listen_addr="127.0.0.1:8443", rules=rules, clients=clients or Clients())
    return Policy.from_config(config)


def allowed_by(policy: Policy, name: str) -> Rule | None:
    decision = policy.decide(name, 443)
    return decision.rule if isinstance(decision, Route) else None


EXACT = Rule(match="a.example.com")
WILDCARD = Rule(match="*.example.com")
SUFFIX = Rule(suffix="example.com")
REGEX = Rule(regex=r"api-\d+\.example\.com")


@pytest.mark.parametrize(
    ("rule", "name", "matches"),
    [
        (EXACT, "a.example.com", True),
        (EXACT, "b.example.com", False),
        (EXACT, "x.a.example.com", False),
        (EXACT, "example.com", False),
        (EXACT, "aa.example.com", False),
        (WILDCARD, "a.example.com", True),
        (WILDCARD, "a.b.c.example.com", True),
        (WILDCARD, "example.com", False),
        (WILDCARD, "notexample.com", False),
        (WILDCARD, "a.notexample.com", False),
        (WILDCARD, "example.com.evil.net", False),
        (WILDCARD, "a.example.com.evil.net", False),
        (WILDCARD, "example.co", False),
        (SUFFIX, "example.com", True),
        (SUFFIX, "a.example.com", True),
        (SUFFIX, "a.b.example.com", True),
        (SUFFIX, "notexample.com", False),
        (SUFFIX, "a-example.com", False),
        (SUFFIX, "example.com.evil.net", False),
        (SUFFIX, "xample.com", False),
        (SUFFIX, "com", False),
        (REGEX, "api-1.example.com", True),
        (REGEX, "api-42.example.com", True),
        # Anchored at both ends: neither a prefix nor a suffix of the name may be left over.
        (REGEX, "x.api-1.example.com", False),
        (REGEX, "api-1.example.com.evil.net", False),
        (REGEX, "api-.example.com", False),
    ],
)
def test_rule_kinds_match_on_label_boundaries(rule: Rule, name: str, matches: bool) -> None:
    assert (allowed_by(make_policy(rule), name) is rule) is matches


def test_patterns_are_normalised_like_names() -> None:
    upper = Rule(match="A.Example.COM")
    dotted_suffix = Rule(suffix=".Example.Org")
    upper_regex = Rule(regex=r"API\.EXAMPLE\.NET")
    policy = make_policy(upper, dotted_suffix, upper_regex)
    assert allowed_by(policy, "a.example.com") is upper
    # A leading dot in a suffix means the same as none: the name itself matches too.
    assert allowed_by(policy, "example.org") is dotted_suffix
    assert allowed_by(policy, "www.example.org") is dotted_suffix
    assert allowed_by(policy, "api.example.net") is upper_regex


def test_default_deny_names_the_sni() -> None:
    assert make_policy().decide("evil.test", 443) == Deny(
        "denied_domain", 'no rule allows "evil.test"'
    )
    assert make_policy(EXACT).decide("evil.test", 443) == Deny(
        "denied_domain", 'no rule allows "evil.test"'
    )


def test_deny_wins_wherever_it_is() -> None:
    deny = Rule(match="*.bad.test", action="deny")
    allow_all = Rule(suffix="test")
    for rules in [(deny, allow_all), (allow_all, deny)]:
        policy = make_policy(*rules)
        assert policy.decide("x.bad.test", 443) == Deny(
            "denied_domain", 'rule "*.bad.test" denies "x.bad.test"'
        )
        assert isinstance(policy.decide("bad.test", 443), Route)  # wildcard excludes the base
        assert isinstance(policy.decide("good.test", 443), Route)


def test_deny_detail_uses_the_rule_label() -> None:
    named = Rule(regex=r"mal.*", action="deny", name="malware list")
    unnamed = Rule(regex=r"ads\..*", action="deny")
    policy = make_policy(named, unnamed, Rule(suffix="test"))
    assert policy.decide("malware.test", 443) == Deny(
        "denied_domain", 'rule "malware list" denies "malware.test"'
    )
    assert policy.decide("ads.test", 443) == Deny(
        "denied_domain", 'rule "regex:ads\\..*" denies "ads.test"'
    )


def test_first_matching_allow_rule_wins_in_config_order() -> None:
    specific = Rule(match="api.example.com", target="10.1.1.1:8443", allow_private=True)
    regex = Rule(regex=r"[a-z]+\.example\.com", target="backend.test:443")
    broad = Rule(suffix="example.com")
    policy = make_policy(specific, regex, broad)
    assert allowed_by(policy, "api.example.com") is specific
    assert allowed_by(policy, "www.example.com") is regex
    assert allowed_by(policy, "www1.example.com") is broad
    assert allowed_by(policy, "example.com") is broad
    # Reversed, the broad suffix rule shadows the rest.
    reversed_policy = make_policy(broad, regex, specific)
    assert allowed_by(reversed_policy, "api.example.com") is broad
    assert allowed_by(reversed_policy, "www.example.com") is broad


def test_a_regex_earlier_in_the_config_beats_a_later_table_rule() -> None:
    regex = Rule(regex=r"a\.example\.com")
    policy = make_policy(regex, EXACT)
    assert allowed_by(policy, "a.example.com") is regex
    assert allowed_by(make_policy(EXACT, regex), "a.example.com") is EXACT


def test_an_alpn_rule_takes_the_clients_offering_it_and_only_those() -> None:
    """TLS-ALPN-01 challenges (``acme-tls/1``) to the certificate manager, the rest of the
    name's connections to the site; an earlier rule without ``alpn`` still wins."""
    acme = Rule(suffix="example.com", alpn=("acme-tls/1",), target="127.0.0.1:9443")
    site = Rule(suffix="example.com")
    policy = make_policy(acme, site)
    challenge = policy.decide("www.example.com", 443, ("acme-tls/1",))
    assert isinstance(challenge, Route)
    assert challenge.rule is acme
    assert (challenge.host, challenge.port) == ("127.0.0.1", 9443)
    for offered in ((), ("h2", "http/1.1")):
        route = policy.decide("www.example.com", 443, offered)
        assert isinstance(route, Route)
        assert route.rule is site
    assert make_policy(site, acme).decide("a.example.com", 443, ("acme-tls/1",)).rule is site  # type: ignore[union-attr]
    denied = make_policy(Rule(suffix="example.com", action="deny", alpn=("h2",)), site)
    assert isinstance(denied.decide("a.example.com", 443, ("http/1.1", "h2")), Deny)
    assert isinstance(denied.decide("a.example.com", 443, ("http/1.1",)), Route)


@pytest.mark.parametrize(
    ("alpn", "words"),
    [([], "empty list"), ([""], "not an ALPN"), (["x" * 256], "not an ALPN")],
)
def test_bad_alpn_lists_are_refused(alpn: list[str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Rule(suffix="example.com", alpn=tuple(alpn))


def test_sni_routes_use_the_listener_target_port() -> None:
    policy = make_policy(WILDCARD)
    assert policy.decide("www.example.com", 8443) == Route(
        host="www.example.com", port=8443, rule=WILDCARD, allow_private=False, fixed_target=False
    )


@pytest.mark.parametrize(
    ("target", "host", "port"),
    [
        ("backend.internal:9443", "backend.internal", 9443),
        ("127.0.0.3:443", "127.0.0.3", 443),
        ("[::1]:8443", "::1", 8443),
    ],
)
def test_fixed_targets_route_to_the_rule_target(target: str, host: str, port: int) -> None:
    rule = Rule(match="app.example.com", target=target, allow_private=True)
    assert make_policy(rule).decide("app.example.com", 443) == Route(
        host=host, port=port, rule=rule, allow_private=True, fixed_target=True
    )


def test_from_rules_needs_no_listener() -> None:
    policy = Policy.from_rules([SUFFIX])
    assert allowed_by(policy, "www.example.com") is SUFFIX
    assert policy.check_client(ipaddress.ip_address("192.0.2.1")) is None


# --------------------------------------------------------------------------------------------
# Client lists


def client(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_empty_client_lists_allow_everyone() -> None:
    policy = make_policy()
    for text in ["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1", "10.0.0.1"]:
        assert policy.check_client(client(text)) is None


CLIENTS = Clients(
    allow=("192.0.2.0/24", "10.0.0.0/8", "2001:db8::/32"),
    deny=("10.66.0.0/16", "192.0.2.99/32", "2001:db8:bad::/48", "::ffff:10.77.0.0/112"),
)


@pytest.mark.parametrize(
    ("address", "detail"),
    [
        ("192.0.2.1", None),
        ("10.1.2.3", None),
        ("2001:db8::1", None),
        ("2001:db8:bad::1", "client 2001:db8:bad::1 is in clients.deny (2001:db8:bad::/48)"),
        ("10.66.1.1", "client 10.66.1.1 is in clients.deny (10.66.0.0/16)"),
        ("192.0.2.99", "client 192.0.2.99 is in clients.deny (192.0.2.99/32)"),
        # An IPv4-mapped CIDR in the config is the IPv4 network it maps.
        ("10.77.3.4", "client 10.77.3.4 is in clients.deny (10.77.0.0/16)"),
        ("198.51.100.1", "client 198.51.100.1 is not in clients.allow"),
        ("2001:db9::1", "client 2001:db9::1 is not in clients.allow"),
        # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d: judged as IPv4.
        ("::ffff:192.0.2.1", None),
        ("::ffff:10.66.1.1", "client 10.66.1.1 is in clients.deny (10.66.0.0/16)"),
        ("::ffff:198.51.100.1", "client 198.51.100.1 is not in clients.allow"),
    ],
)
def test_client_cidrs(address: str, detail: str | None) -> None:
    result = make_policy(clients=CLIENTS).check_client(client(address))
    assert result == (None if detail is None else Deny("denied_client", detail))


def test_client_deny_wins_over_a_more_specific_allow() -> None:
    policy = make_policy(clients=Clients(allow=("10.1.2.0/24",), deny=("10.0.0.0/8",)))
    assert policy.check_client(client("10.1.2.3")) == Deny(
        "denied_client", "client 10.1.2.3 is in clients.deny (10.0.0.0/8)"
    )


def test_client_deny_reports_the_most_specific_network() -> None:
    policy = make_policy(clients=Clients(deny=("10.0.0.0/8", "10.1.0.0/16", "0.0.0.0/0")))
    assert policy.check_client(client("10.1.2.3")) == Deny(
        "denied_client", "client 10.1.2.3 is in clients.deny (10.1.0.0/16)"
    )
    assert policy.check_client(client("8.8.8.8")) == Deny(
        "denied_client", "client 8.8.8.8 is in clients.deny (0.0.0.0/0)"
    )
    assert policy.check_client(client("2001:db8::1")) is None  # an IPv4 list says nothing of v6


# --------------------------------------------------------------------------------------------
# Properties

# Short labels from a tiny alphabet, so that generated names and rules collide often.
label = st.sampled_from(["a", "b", "c", "ab", "b-c", "x1"])
names = st.lists(label, min_size=1, max_size=4).map(".".join)
alpn_ids = st.sampled_from(["h2", "http/1.1", "acme-tls/1"])
regexes = st.sampled_from([r"a\..*", r".*\.b", r"[ab]+", r"a\.b", r"(x1|ab)\..+", r"A\.B"])


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    actions: tuple[Action, ...] = ("allow", "deny")
    action = draw(st.sampled_from(actions))
    kind = draw(st.sampled_from(["exact", "wildcard", "suffix", "regex"]))
    alpn = draw(st.none() | st.lists(alpn_ids, min_size=1, max_size=2, unique=True).map(tuple))
    if kind == "regex":
        return Rule(regex=draw(regexes), action=action, alpn=alpn)
    base = draw(names)
    if kind == "suffix":
        return Rule(suffix=base, action=action, alpn=alpn)
    return Rule(match=("*." if kind == "wildcard" else "") + base, action=action, alpn=alpn)


def reference_matches(rule: Rule, name: str, offered: tuple[str, ...] = ()) -> bool:
    """The definition of each rule kind, written as plainly as possible."""
    if rule.alpn is not None and not set(rule.alpn) & set(offered):
        return False
    labels = name.split(".")
    if rule.regex is not None:
        return re.fullmatch(rule.regex, name, re.IGNORECASE) is not None
    if rule.suffix is not None:
        base = rule.suffix.split(".")
        return len(labels) >= len(base) and labels[-len(base) :] == base
    assert rule.match is not None
    if rule.match.startswith("*."):
        base = rule.match[2:].split(".")
        return len(labels) > len(base) and labels[-len(base) :] == base
    return name == rule.match


@given(st.lists(rules(), max_size=8), names, st.lists(alpn_ids, max_size=2).map(tuple))
def test_policy_agrees_with_a_linear_reference(
    rule_list: list[Rule], name: str, offered: tuple[str, ...]
) -> None:
    decision = make_policy(*rule_list).decide(name, 443, offered)
    denying = [r for r in rule_list if r.action == "deny" and reference_matches(r, name, offered)]
    allowing = [r for r in rule_list if r.action == "allow" and reference_matches(r, name, offered)]
    if denying:
        assert decision == Deny("denied_domain", f'rule "{denying[0].label}" denies "{name}"')
    elif allowing:
        assert isinstance(decision, Route)
        assert decision.rule is allowing[0]
    else:
        assert decision == Deny("denied_domain", f'no rule allows "{name}"')


ldh = st.text(alphabet="abcdefghijklm0123456789-", min_size=1, max_size=10).filter(
    lambda s: not s.startswith("-") and not s.endswith("-")
)
base_names = st.builds(
    lambda labels, tld: ".".join([*labels, tld]),
    st.lists(ldh, max_size=3),
    st.text(alphabet="abcdefghijklm", min_size=2, max_size=6),
)
# Labels from letters the base never uses, so the tail cannot recreate the base by accident.
foreign_tails = st.lists(
    st.text(alphabet="nopqrstuvwxyz", min_size=1, max_size=6), min_size=1, max_size=3
).map(".".join)


@given(base_names, ldh)
def test_glued_prefixes_never_match(base: str, glue: str) -> None:
    """``not`` + ``example.com``: no rule for the base matches across a label boundary."""
    policy = make_policy(Rule(match=base), Rule(match="*." + base), Rule(suffix=base))
    assert policy.decide(glue + base, 443) == Deny(
        "denied_domain", f'no rule allows "{glue + base}"'
    )


@given(base_names, foreign_tails)
def test_appended_labels_never_match(base: str, tail: str) -> None:
    """``example.com.evil.net`` is not ``example.com`` nor anything below it."""
    policy = make_policy(Rule(match=base), Rule(match="*." + base), Rule(suffix=base))
    name = f"{base}.{tail}"
    assert policy.decide(name, 443) == Deny("denied_domain", f'no rule allows "{name}"')


@given(base_names, st.lists(ldh, min_size=1, max_size=3).map(".".join))
def test_names_below_the_base_match_wildcard_and_suffix(base: str, below: str) -> None:
    wildcard, suffix = Rule(match="*." + base), Rule(suffix=base)
    assert allowed_by(make_policy(wildcard), f"{below}.{base}") is wildcard
    assert allowed_by(make_policy(suffix), f"{below}.{base}") is suffix
    assert allowed_by(make_policy(suffix), base) is suffix
    assert allowed_by(make_policy(wildcard), base) is None


def test_only_listed_networks_may_send_proxy_headers() -> None:
    from trio_sni.sansio.config import Listener
    from trio_sni.sansio.policy import check_proxy_sender

    open_to_all = Listener("0.0.0.0", 443, accept_proxy_protocol=True)
    assert check_proxy_sender(open_to_all, client("192.0.2.1")) is None
    behind_lb = Listener(
        "::", 443, accept_proxy_protocol=True, proxy_protocol_from=("10.1.0.0/16", "2001:db8::/32")
    )
    assert check_proxy_sender(behind_lb, client("10.1.2.3")) is None
    assert check_proxy_sender(behind_lb, client("::ffff:10.1.2.3")) is None  # dual stack
    assert check_proxy_sender(behind_lb, client("2001:db8::5")) is None
    deny = check_proxy_sender(behind_lb, client("::ffff:10.2.0.1"))
    assert deny is not None
    assert deny.reason == "untrusted_proxy"
    assert deny.detail == (
        "10.2.0.1 may not send PROXY headers to [::]:443: it is not in the listener's "
        "proxy_protocol_from"
    )


def test_a_fixed_target_without_a_port_uses_the_listeners_target_port() -> None:
    config = load_config(
        {
            "listen_addr": "127.0.0.1:1",
            "rules": [
                {"match": "a.test", "target": "192.0.2.7"},
                {"match": "b.test", "target": "::1"},
                {"match": "c.test", "target": "[2001:db8::1]:8443"},
            ],
        }
    )
    policy = Policy.from_config(config)
    routes = [policy.decide(name, 443) for name in ("a.test", "b.test", "c.test")]
    assert [(r.host, r.port) for r in routes] == [  # type: ignore[union-attr]
        ("192.0.2.7", 443),
        ("::1", 443),
        ("2001:db8::1", 8443),
    ]
