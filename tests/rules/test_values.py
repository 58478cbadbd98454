"""Value normalisation: the one function per kind used by both rules and requests."""

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bootrules import values
from bootrules.errors import FactsError


@pytest.mark.parametrize(
    "text",
    [
        "00:11:22:aa:bb:cc",
        "00-11-22-AA-BB-CC",
        "001122aabbcc",
        "0011.22aa.bbcc",
        "0:11:22:aa:bb:cc",
        " 00:11:22:AA:bb:cc ",
    ],
    ids=["colon", "hyphen-upper", "bare", "cisco-dotted", "unpadded-octet", "padded-mixed-case"],
)
def test_every_mac_notation_normalises_to_one_form(text):
    """Any common MAC notation reads as the same lowercase colon form."""
    assert values.normalize_mac(text) == "00:11:22:aa:bb:cc"


@pytest.mark.parametrize(
    "text", ["", "00:11:22:33:44", "00:11:22:33:44:55:66", "00:11-22:33:44:55", "zz:11:22:33:44:55", "0011223344556", "${mac}"]
)
def test_a_mac_that_is_no_mac_is_refused_with_a_reason(text):
    """Something that is not a MAC raises ValueError naming the expected notations."""
    with pytest.raises(ValueError, match="is not a MAC address"):
        values.normalize_mac(text)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("00:0C:29:*", ("00:0c:29:*", False)),
        ("00-0c-29-*", ("00:0c:29:*", False)),
        ("000c29*", ("000c29*", True)),
        ("*:55", ("*:55", False)),
    ],
)
def test_mac_globs_normalise_separators_and_case(text, expected):
    """MAC globs keep their shape but lose case and hyphen/colon differences."""
    assert values.normalize_mac_glob(text) == expected


@pytest.mark.parametrize("text", ["00:c:29:*", "0c29.*", "00:0g:*"])
def test_malformed_mac_globs_are_refused(text):
    """A MAC glob with a one-digit octet, dots or non-hex characters is an error."""
    with pytest.raises(ValueError):
        values.normalize_mac_glob(text)


@pytest.mark.parametrize(
    "text",
    [
        "4C4C4544-0042-3510-8052-B4C04F4D4E31",
        "4c4c454400423510 8052b4c04f4d4e31".replace(" ", ""),
        "{4c4c4544-0042-3510-8052-b4c04f4d4e31}",
    ],
)
def test_uuid_notations_normalise(text):
    """UUIDs read the same in upper case, without hyphens, or in braces."""
    assert values.normalize_uuid(text) == "4c4c4544-0042-3510-8052-b4c04f4d4e31"


@pytest.mark.parametrize("text", ["4c4c4544-0042-3510-8052", "4c4c4544004235108052b4c04f4d4e3g", "4c4c-4544-0042-3510-8052b4c04f4d4e31"])
def test_bad_uuids_are_refused(text):
    """A UUID with the wrong length, a non-hex digit or misplaced hyphens is an error."""
    with pytest.raises(ValueError, match="is not a UUID"):
        values.normalize_uuid(text)


def test_hex_text_round_trips_characters_iPXE_would_mangle():
    """The entry script's :hexraw form decodes to exactly the firmware's bytes."""
    serial = "S&N+1#x y%20"
    assert values.decode_hex_text(serial.encode().hex()) == serial
    assert values.decode_hex_text("ff41") == "\xffA"  # not UTF-8: read as Latin-1
    with pytest.raises(ValueError, match="is not hex"):
        values.decode_hex_text("abc")


def test_query_facts_accept_plain_and_hex_values_and_ignore_empty_ones():
    """A query yields normalised facts; empty values are absent; unknown keys are listed."""
    facts, ignored = values.facts_from_query(
        {
            "mac": ["52-54-00-12-34-56"],
            "serial_hex": ["S&N+1#x".encode().hex()],
            "product": ["  PowerEdge R640 "],
            "uuid": [""],
            "hostname_hex": [""],
            "platform": ["PCBIOS"],
            "mca": ["00:11:22:33:44:55"],
        }
    )
    assert facts == {"mac": "52:54:00:12:34:56", "serial": "s&n+1#x", "product": "poweredge r640", "platform": "pcbios"}
    assert ignored == ["mca"]


@pytest.mark.parametrize(
    "query,reason",
    [
        ({"mac": ["nope"]}, "mac: 'nope' is not a MAC address"),
        ({"mac": ["00:11:22:33:44:55", "00:11:22:33:44:66"]}, "mac is given 2 different values"),
        ({"uuid": ["1234"]}, "uuid: '1234' is not a UUID"),
        ({"ip": ["10.0.0.300"]}, "ip: '10.0.0.300' is not an IP address"),
        ({"serial_hex": ["xyz"]}, "serial_hex: 'xyz' is not hex"),
        ({"serial": ["a" * 300]}, "longer than 256"),
        ({"platform": ["efi;exit"]}, "is not a platform"),
        ({"serial": ["ABC"], "serial_hex": ["444546"]}, "serial and serial_hex disagree"),
    ],
    ids=["bad-mac", "two-macs", "bad-uuid", "bad-ip", "bad-hex", "too-long", "bad-platform", "plain-vs-hex"],
)
def test_query_values_that_cannot_be_what_they_claim_are_refused(query, reason):
    """Each malformed request value raises FactsError with a one-line reason."""
    with pytest.raises(values.FactsError, match=reason) as caught:
        values.facts_from_query(query)
    assert "\n" not in str(caught.value)


def test_placeholder_uuid_counts_as_absent():
    """The all-zero UUID of firmware without one is dropped rather than matched."""
    facts, _ = values.facts_from_query({"uuid": ["00000000-0000-0000-0000-000000000000"]})
    assert facts == {}


QUERY_NAMES = ["mac", "uuid", "serial", "serial_hex", "product_hex", "ip", "ip6", "platform", "buildarch", "loader",
               "client", "other", "", "ma%63", "serial+hex"]
QUERY_VALUES = ["", "52:54:00:12:34:56", "52-54-00-12-34-57", "5354", "%41%42", "a+b", "10.1.2.3", "fd00::5",
                "efi", "pcbios", "grub", "00000000-0000-0000-0000-000000000000", "zz", "%zz", "x" * 300]
queries = st.lists(st.tuples(st.sampled_from(QUERY_NAMES), st.sampled_from(QUERY_VALUES)), max_size=8).map(
    lambda fields: "&".join(f"{name}={value}" if index % 3 else (name if not value else f"{name}={value}")
                            for index, (name, value) in enumerate(fields)))


def _outcome(parse, query):
    try:
        return parse(query)
    except FactsError as error:
        return str(error)


@settings(max_examples=400, deadline=None)
@given(query=queries)
def test_the_one_pass_query_reader_reads_every_query_as_the_two_steps_do(query):
    """/ipxe reads its query in one pass; for any query (repeated names, encoded names, empty
    fields, bad values) the facts, the ignored names and the errors are those of the two
    steps it replaces."""
    assert _outcome(values.facts_from_query_string, query) == _outcome(
        lambda text: values.facts_from_query(values.parse_query(text)), query)


# Text values, hex-encoded: a serial that reads like a placeholder UUID is still a serial;
# spaces alone are no value.
_ENTRY_TEXT = ["", "5354", "e9", "zz", "a+b", "%41", "41" * 300, "2020",
               "00000000-0000-0000-0000-000000000000".encode().hex()]
ENTRY_VALUES = {
    "mac": ["", "52-54-00-12-34-56", "52:54:00:12:34:zz", "%41"],
    "uuid": ["", "564d1234-5678-90ab-cdef-1234567890ab", "00000000-0000-0000-0000-000000000000", "zz"],
    **{name: _ENTRY_TEXT for name in values.ENTRY_QUERY_NAMES if name.endswith("_hex")},
    "ip": ["", "10.1.2.3", "10.1.2.3=x", "10.1.2"],
    "ip6": ["", "fd00::5", "fd00::zz"],
    "platform": ["", "efi", "pcbios", "pc bios"],
    "buildarch": ["", "x86_64", "i386", "+"],
}
entry_queries = st.tuples(*(st.sampled_from(ENTRY_VALUES[name]) for name in values.ENTRY_QUERY_NAMES)).map(
    lambda sent: "&".join(f"{name}={value}" for name, value in zip(values.ENTRY_QUERY_NAMES, sent)))


@settings(max_examples=400, deadline=None)
@given(query=entry_queries)
@example(query="mac=52-54-00-12-34-56&uuid=&serial_hex=&product_hex=&manufacturer_hex=&asset_hex=&hostname_hex="
               "&ip=&ip6=fd00::5&platform=efi&buildarch=x86_64")
def test_the_entry_scripts_query_is_read_as_the_two_steps_read_it(query):
    """The query the entry script sends is read with one regular expression: whatever its
    values (empty, malformed, encoded, too long, a placeholder UUID, IPv6 only), the facts
    and the errors are those of the two steps."""
    assert _outcome(values.facts_from_query_string, query) == _outcome(
        lambda text: values.facts_from_query(values.parse_query(text)), query)


def _address_by_ipaddress(text):
    """What normalize_address answers, as Python's ipaddress alone would."""
    import ipaddress

    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return "refused"
    return str(address.ipv4_mapped if address.version == 6 and address.ipv4_mapped else address)


_octets = st.one_of(st.integers(0, 300).map(str), st.integers(0, 99).map(lambda n: f"0{n}"), st.sampled_from(["", " 7", "1a"]))


@settings(max_examples=500, deadline=None)
@given(octets=st.lists(_octets, min_size=3, max_size=5), around=st.sampled_from(["", " ", "\n"]))
@example(octets=["255", "255", "255", "255"], around="")
@example(octets=["0", "0", "0", "0"], around="")
def test_an_ipv4_address_is_read_as_pythons_ipaddress_reads_it(octets, around):
    """IPv4 addresses written canonically skip ipaddress (a storm's machines each send their
    own): any dotted text, with leading zeros, out of range or padded, is still read or
    refused exactly as ipaddress reads it."""
    text = around + ".".join(octets) + around
    try:
        ours = values.normalize_address(text)
    except ValueError:
        ours = "refused"
    assert ours == _address_by_ipaddress(text)
