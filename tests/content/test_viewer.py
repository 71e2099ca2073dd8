"""The viewer is normalised and checked at the edge (rules.md, Fine print; Context fields)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from factories import NOW, t

from content.errors import ContentError, InvalidViewer
from content.viewer import make_viewer

# -- normalisation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "stored"), [("de", "DE"), ("De", "DE"), ("DE", "DE"), ("", None), (None, None)]
)
def test_country_codes_are_upper_cased(given: str | None, stored: str | None) -> None:
    assert make_viewer(at=NOW, country=given).country == stored


def test_a_naive_date_time_is_utc() -> None:
    # given 2026-11-20 12:00 without an offset
    viewer = make_viewer(at=datetime(2026, 11, 20, 12, 0))
    # then it is 12:00 UTC
    assert viewer.at == datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    assert viewer.at.utcoffset() == timedelta(0)
    assert viewer.local_hour == 12


def test_a_date_time_with_an_offset_is_the_same_instant_in_utc() -> None:
    # given 13:00 at +01:00, which is 12:00 UTC
    viewer = make_viewer(at=datetime(2026, 11, 20, 13, 0, tzinfo=timezone(timedelta(hours=1))))
    # then `at` is 12:00 UTC, and without a viewer time zone the local hour is the UTC hour, 12
    assert viewer.at == NOW
    assert viewer.at.utcoffset() == timedelta(0)
    assert viewer.local_hour == 12
    assert viewer.local_time == "12:00"


@pytest.mark.parametrize(
    "zone",
    [
        "Mars/Olympus_Mons",
        "CEST",
        "+01:00",
        "Europe/berlin ",
        "Europe/Berlin/",
        "../etc/passwd",
        # files of a host's zoneinfo directory that are not IANA zones
        "localtime",
        "posixrules",
        "posix/Europe/Berlin",
        "right/UTC",
    ],
)
def test_a_time_zone_that_is_not_an_iana_zone_is_an_invalid_viewer(zone: str) -> None:
    with pytest.raises(InvalidViewer) as raised:
        make_viewer(at=NOW, timezone=zone)
    assert raised.value.path == "viewer.timezone"
    assert isinstance(raised.value, ContentError)


@pytest.mark.parametrize(
    "zone", ["UTC", "Etc/UTC", "Europe/Berlin", "America/Argentina/Buenos_Aires", "Etc/GMT-14"]
)
def test_iana_zones_are_accepted(zone: str) -> None:
    assert make_viewer(at=NOW, timezone=zone).timezone == zone


def test_an_empty_time_zone_is_no_time_zone_and_means_utc() -> None:
    viewer = make_viewer(at=NOW, timezone="")
    assert viewer.timezone is None
    assert viewer.local_hour == 12


@pytest.mark.parametrize(("field", "value"), [("device", "PHONE"), ("device", "mobile"), ("channel", "SMS")])
def test_an_unknown_device_or_channel_is_an_invalid_viewer(field: str, value: str) -> None:
    with pytest.raises(InvalidViewer) as raised:
        make_viewer(at=NOW, **{field: value})
    assert raised.value.path == f"viewer.{field}"


def test_an_empty_string_id_is_no_id() -> None:
    # given empty user and anonymous ids
    viewer = make_viewer(at=NOW, user_id="", anonymous_id="")
    # then the viewer has no ids and no unit
    assert viewer.user_id is None
    assert viewer.anonymous_id is None
    assert viewer.unit() is None
    assert viewer.unit("anonymousId") is None


def test_an_empty_user_id_falls_back_to_the_anonymous_id_as_unit() -> None:
    assert make_viewer(at=NOW, user_id="", anonymous_id="a-42").unit() == "a-42"


def test_the_unit_is_the_user_id_else_the_anonymous_id_unless_stickiness_is_anonymous_id() -> None:
    both = make_viewer(at=NOW, user_id="u-1", anonymous_id="a-42")
    assert both.unit() == "u-1"
    assert both.unit("userId") == "u-1"
    assert both.unit("anonymousId") == "a-42"
    only_user = make_viewer(at=NOW, user_id="u-1")
    assert only_user.unit("anonymousId") is None


def test_anonymised_keeps_the_context_and_drops_the_ids() -> None:
    viewer = make_viewer(at=NOW, user_id="u-1", anonymous_id="a-42", device="MOBILE", country="de")
    anonymous = viewer.anonymised()
    assert (anonymous.user_id, anonymous.anonymous_id) == (None, None)
    assert (anonymous.device, anonymous.country, anonymous.at) == ("MOBILE", "DE", NOW)


# -- local_hour, local_weekday, local_time in the viewer's time zone --------------------------------


@pytest.mark.parametrize(
    ("at", "zone", "hour", "weekday", "time"),
    [
        # 2026-11-20 is a Friday (ISO weekday 5); no time zone means UTC
        ("2026-11-20T12:00:00+00:00", None, 12, 5, "12:00"),
        ("2026-11-20T12:00:00+00:00", "UTC", 12, 5, "12:00"),
        # India is +05:30 all year: minutes matter
        ("2026-11-20T12:00:00+00:00", "Asia/Kolkata", 17, 5, "17:30"),
        # Sunday 23:30 UTC is Monday 00:30 in Berlin (+01:00 in November): weekday 1 = Monday
        ("2026-11-22T23:30:00+00:00", "Europe/Berlin", 0, 1, "00:30"),
        ("2026-11-22T23:30:00+00:00", None, 23, 7, "23:30"),
        # Friday 02:00 UTC is still Thursday 18:00 in Los Angeles (-08:00 in November)
        ("2026-11-20T02:00:00+00:00", "America/Los_Angeles", 18, 4, "18:00"),
        # Berlin springs forward on Sunday 2026-03-29 at 01:00 UTC: 01:59 CET, then 03:00 CEST
        ("2026-03-29T00:59:00+00:00", "Europe/Berlin", 1, 7, "01:59"),
        ("2026-03-29T01:00:00+00:00", "Europe/Berlin", 3, 7, "03:00"),
        # and falls back on Sunday 2026-10-25 at 01:00 UTC: 02:30 happens twice
        ("2026-10-25T00:30:00+00:00", "Europe/Berlin", 2, 7, "02:30"),
        ("2026-10-25T01:30:00+00:00", "Europe/Berlin", 2, 7, "02:30"),
        ("2026-10-25T02:30:00+00:00", "Europe/Berlin", 3, 7, "03:30"),
        # New York springs forward on Sunday 2026-03-08 at 07:00 UTC: 01:59 EST, then 03:00 EDT
        ("2026-03-08T06:59:00+00:00", "America/New_York", 1, 7, "01:59"),
        ("2026-03-08T07:00:00+00:00", "America/New_York", 3, 7, "03:00"),
        # in summer New York is -04:00: 12:00 UTC is 08:00
        ("2026-07-01T12:00:00+00:00", "America/New_York", 8, 3, "08:00"),
    ],
)
def test_local_fields_are_read_in_the_viewer_time_zone(
    at: str, zone: str | None, hour: int, weekday: int, time: str
) -> None:
    viewer = make_viewer(at=t(at), timezone=zone)
    assert (viewer.local_hour, viewer.local_weekday, viewer.local_time) == (hour, weekday, time)
    assert viewer.at == t(at)  # the instant itself is never shifted


def test_attributes_default_to_an_empty_object_and_are_kept_as_given() -> None:
    assert dict(make_viewer(at=NOW).attributes) == {}
    attributes = {"utm": {"source": "newsletter"}, "page": "/shop"}
    assert make_viewer(at=NOW, attributes=attributes).attributes == attributes


def test_attributes_that_are_not_an_object_are_an_invalid_viewer() -> None:
    with pytest.raises(InvalidViewer) as raised:
        make_viewer(at=NOW, attributes=["utm"])  # type: ignore[arg-type]
    assert raised.value.path == "viewer.attributes"
