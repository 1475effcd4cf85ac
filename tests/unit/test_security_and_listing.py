"""Password hashing, ids and the list-parameter parser."""

from __future__ import annotations

import pytest

from cml_appliance.api.listing import next_page_token, parse_list_query
from cml_appliance.core.errors import InvalidArgument
from cml_appliance.core.ids import PUBLIC_ID_RE, new_public_id, slugify
from cml_appliance.core.security import hash_password, verify_password
from cml_appliance.projects.files import clean_relative

KEYS = {"name": "p.name", "owner.username": "ow.username"}


def test_password_hash_is_salted_scrypt() -> None:
    a, b = hash_password("s3cret-pass"), hash_password("s3cret-pass")
    assert a != b and a.startswith("scrypt$16384$8$1$")
    assert verify_password("s3cret-pass", a) and not verify_password("wrong", a)
    assert not verify_password("x", None) and not verify_password("x", "garbage")


def test_ids_and_slugs() -> None:
    assert PUBLIC_ID_RE.match(new_public_id())
    assert slugify("My  Great Project!") == "my-great-project" and slugify("???") == "project"


def test_page_tokens_round_trip_and_bind_to_the_query() -> None:
    q = parse_list_query({"page_size": "5", "sort": "-name"}, secret="s", scope="/p", filter_keys=KEYS, sort_keys=KEYS)
    token = next_page_token(q, "s", True)
    q2 = parse_list_query(
        {"page_size": "5", "sort": "-name", "page_token": token}, secret="s", scope="/p", filter_keys=KEYS, sort_keys=KEYS
    )
    assert q2.offset == 5
    assert next_page_token(q2, "s", False) == ""
    for query in (
        {"page_size": "5", "sort": "-name", "page_token": token, "search_filter": '{"name":"x"}'},
        {"page_size": "5", "sort": "-name", "page_token": token.replace(".", ".0")},
    ):
        with pytest.raises(InvalidArgument):
            parse_list_query(query, secret="s", scope="/p", filter_keys=KEYS, sort_keys=KEYS)
    with pytest.raises(InvalidArgument):
        parse_list_query({"page_size": "5", "sort": "-name", "page_token": token}, secret="other", scope="/p",
                         filter_keys=KEYS, sort_keys=KEYS)
    with pytest.raises(InvalidArgument):
        parse_list_query({"page_size": "5", "sort": "-name", "page_token": token}, secret="s", scope="/q",
                         filter_keys=KEYS, sort_keys=KEYS)


@pytest.mark.parametrize("bad", ["../x", "a/../../b", "/abs", "\\\\server\\share", "a\x00b"])
def test_relative_paths_refuse_escapes(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        clean_relative(bad)


def test_relative_paths_normalise() -> None:
    assert clean_relative("a//b/./c/") == "a/b/c" and clean_relative("") == "" and clean_relative(".") == ""
