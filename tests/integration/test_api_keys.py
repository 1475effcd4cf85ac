"""API v2 keys: create (shown once), list, delete, delete all, validate, expiry, audiences."""

from __future__ import annotations

from tests.conftest import Api, assert_error


async def test_create_list_delete_keys(alice: Api) -> None:
    status, created = await alice.post(
        "/api/v2/users/alice/v2_keys", json={"comments": "ci", "audiences": ["API"], "expiry_date": "2099-01-01T00:00:00Z"}
    )
    assert status == 200, created
    assert created["api_key"] and created["key_id"] and created["audiences"] == ["API"]
    assert created["expiry_date"].startswith("2099-01-01T00:00:00")

    status, listed = await alice.get("/api/v2/users/alice/v2_keys")
    assert status == 200
    ids = [k["key_id"] for k in listed["keys"]]
    assert created["key_id"] in ids
    # The secret is never listed again.
    assert all("api_key" not in k for k in listed["keys"])

    new_client = Api(alice.client, created["api_key"], "alice")
    status, _ = await new_client.get("/api/v2/projects")
    assert status == 200

    status, body = await alice.delete(f"/api/v2/users/alice/v2_keys/{created['key_id']}")
    assert (status, body) == (200, {})
    status, body = await new_client.get("/api/v2/projects")
    assert_error(status, body, 401)


async def test_delete_all_keys_revokes_every_key(alice: Api) -> None:
    await alice.post("/api/v2/users/alice/v2_keys", json={})
    status, body = await alice.delete("/api/v2/users/alice/v2_keys")
    assert (status, body) == (200, {})
    status, body = await alice.get("/api/v2/projects")
    assert_error(status, body, 401)


async def test_validate_key_reports_user_and_audience(alice: Api) -> None:
    status, body = await alice.post("/api/v2/auth/validate_key", json={"audience": "API"})
    assert status == 200
    assert body == {"valid": True, "username": "alice", "message": "API key is valid for the given audience"}

    _, created = await alice.post("/api/v2/users/alice/v2_keys", json={"audiences": ["Application"]})
    app_only = Api(alice.client, created["api_key"], "alice")
    status, body = await app_only.post("/api/v2/auth/validate_key", json={"audience": "API"})
    assert status == 200 and body["valid"] is False
    status, body = await app_only.post("/api/v2/auth/validate_key", json={"audience": "Application"})
    assert body["valid"] is True
    # An Application-only key cannot call the API.
    status, body = await app_only.get("/api/v2/projects")
    assert_error(status, body, 401)

    bogus = Api(alice.client, "not-a-key", "nobody")
    status, body = await bogus.post("/api/v2/auth/validate_key", json={})
    assert status == 200 and body["valid"] is False and body["username"] == ""


async def test_expired_key_is_refused(alice: Api) -> None:
    from cml_appliance.web.keys import POOL

    _, created = await alice.post("/api/v2/users/alice/v2_keys", json={})
    await alice.client.app[POOL].execute(
        "UPDATE api_keys SET expires_at = now() - interval '1 minute' WHERE key_id = $1", created["key_id"]
    )
    expired = Api(alice.client, created["api_key"], "alice")
    status, body = await expired.get("/api/v2/projects")
    assert_error(status, body, 401)
    assert "expired" in body["message"]


async def test_bad_key_requests(alice: Api) -> None:
    for payload, fragment in (
        ({"expiry_date": "yesterday"}, "RFC 3339"),
        ({"expiry_date": "2001-01-01T00:00:00Z"}, "future"),
        ({"audiences": ["Everything"]}, "audience"),
        ({"audiences": "API"}, "audiences"),
        ({"colour": "blue"}, "unknown field"),
    ):
        status, body = await alice.post("/api/v2/users/alice/v2_keys", json=payload)
        assert_error(status, body, 400)
        assert fragment in body["message"], body


async def test_keys_of_another_user_are_not_reachable(alice: Api, bob: Api, admin: Api) -> None:
    for method in ("GET", "POST", "DELETE"):
        status, body = await bob.call(method, "/api/v2/users/alice/v2_keys", json={} if method == "POST" else None)
        assert_error(status, body, 404)
    status, body = await bob.delete("/api/v2/users/alice/v2_keys/whatever")
    assert_error(status, body, 404)
    # A site admin manages anyone's keys.
    status, body = await admin.get("/api/v2/users/alice/v2_keys")
    assert status == 200 and len(body["keys"]) == 1


async def test_no_key_or_wrong_scheme_is_401(client) -> None:  # type: ignore[no-untyped-def]
    resp = await client.get("/api/v2/projects")
    assert_error(resp.status, await resp.json(), 401)
    resp = await client.get("/api/v2/projects", headers={"Authorization": "Basic Zm9vOg=="})
    assert_error(resp.status, await resp.json(), 401)
