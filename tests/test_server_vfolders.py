"""The vfolders REST API: two users, sharing, trash, quotas, files, and bad input."""

from __future__ import annotations

import asyncio
import os

import pytest

from .api_support import ADMIN, Api, server_fixtures

jp_server_config, _ = server_fixtures(
    GPUSessionManager={"policies": {"default": {"max_vfolder_size": "1MiB"}}}
)


@pytest.fixture
def api(jp_fetch, jp_serverapp):
    manager = jp_serverapp.web_app.settings["gpu_sessions_engine"].manager
    for user in ("alice", "bob", "carol"):  # as if the server had seen them: invitable
        manager.admin.touch_user(user, ())
    yield Api(jp_fetch)
    service = manager.vfolders
    for user in ("alice", "bob", "carol", ADMIN):
        who = manager.identity(user, is_admin=user == ADMIN)
        for item in service.list(who):
            if item["relation"] == "own" or (user == ADMIN and item["type"] == "project"):
                service.delete(who, item["id"])
        for item in service.list_trash(who):
            service.purge(who, item["id"])


async def _upload(api: Api, name: str, path: str, data: bytes, user: str = "alice"):
    return await api.put(f"vfolders/{name}/upload", user=user, params={"path": path}, raw=data)


async def _download(api: Api, name: str, path: str, user: str = "alice") -> bytes:
    response = await api.fetch(
        "gpu-sessions",
        "api",
        "vfolders",
        name,
        "download",
        params={"path": path},
        headers={"Authorization": f"token {user}-token"},
    )
    return response.body


async def test_two_users_cannot_reach_each_others_vfolders_unless_shared(api):
    status, created = await api.post("vfolders", body={"name": "data", "quota": "512KiB"})
    assert status == 201 and created["permission"] == "wd" and created["relation"] == "own"
    status, body = await _upload(api, "data", "notes/a.txt", b"alice's notes")
    assert status == 404 and "mkdir" in body["message"]  # the folder must exist first
    assert (await api.post("vfolders/data/mkdir", body={"path": "notes"}))[0] == 201
    status, entry = await _upload(api, "data", "notes/a.txt", b"alice's notes")
    assert status == 201 and entry["size"] == 13

    _, listing = await api.get("vfolders", user="bob")
    assert listing["vfolders"] == []
    for method, path, kwargs in [
        ("GET", "vfolders/data", {}),
        ("PATCH", "vfolders/data", {"body": {"cloneable": True}}),
        ("DELETE", "vfolders/data", {}),
        ("GET", "vfolders/data/files", {}),
        ("GET", "vfolders/data/download", {"params": {"path": "notes/a.txt"}}),
        ("PUT", "vfolders/data/upload", {"params": {"path": "x"}, "raw": b"x"}),
        ("POST", "vfolders/data/mkdir", {"body": {"path": "x"}}),
        ("DELETE", "vfolders/data/files", {"params": {"path": "notes"}}),
        ("GET", "vfolders/data/shares", {}),
        ("POST", "vfolders/data/shares", {"body": {"user": "bob", "permission": "wd"}}),
        ("POST", "vfolders/data/clone", {"body": {"name": "mine-now"}}),
        ("GET", "vfolders/data/usage", {}),
    ]:
        status, body = await api.call(method, path, user="bob", **kwargs)
        assert status == 404, (method, path, status, body)
        assert "alice" not in body["message"]

    # Shared read-only: bob can read, not write; then rw; then revoked.
    status, share = await api.post("vfolders/data/shares", body={"user": "bob", "permission": "ro"})
    assert status == 201 and share["state"] == "invited"
    _, invitations = await api.get("vfolder-invitations", user="bob")
    (received,) = invitations["received"]
    status, _ = await api.post(f"vfolder-invitations/{received['id']}/accept", user="bob")
    assert status == 200
    _, listing = await api.get("vfolders", user="bob")
    assert [(v["name"], v["permission"], v["relation"]) for v in listing["vfolders"]] == [
        ("data", "ro", "shared")
    ]
    body = await _download(api, "data", "notes/a.txt", user="bob")
    assert body == b"alice's notes"
    status, body = await _upload(api, "data", "notes/b.txt", b"bob", user="bob")
    assert status == 403 and "ro" in body["message"]
    status, _ = await api.delete("vfolders/data", user="bob")
    assert status in (403, 404)

    status, _ = await api.patch("vfolders/data/shares/bob", body={"permission": "rw"})
    assert status == 200
    status, _ = await _upload(api, "data", "notes/b.txt", b"bob", user="bob")
    assert status == 201
    status, body = await api.delete(
        "vfolders/data/files", user="bob", params={"path": "notes/b.txt"}
    )
    assert status == 403  # rw may write, not delete (that is wd)

    status, _ = await api.delete("vfolders/data/shares/bob")
    assert status == 204
    status, _ = await api.get("vfolders/data", user="bob")
    assert status == 404


async def test_declined_invitations_give_no_access(api):
    await api.post("vfolders", body={"name": "papers"})
    _, share = await api.post("vfolders/papers/shares", body={"user": "carol", "permission": "rw"})
    status, declined = await api.post(f"vfolder-invitations/{share['id']}/decline", user="carol")
    assert status == 200 and declined["state"] == "declined"
    assert (await api.get("vfolders/papers", user="carol"))[0] == 404
    # only the invitee answers an invitation
    _, share = await api.post("vfolders/papers/shares", body={"user": "carol", "permission": "rw"})
    status, _ = await api.post(f"vfolder-invitations/{share['id']}/accept", user="bob")
    assert status == 404


@pytest.mark.parametrize(
    "name",
    ["a/b", "..", "a..b", "with\x00nul", ".hidden", "x" * 65, "", "sp ace"],
)
async def test_bad_vfolder_names_are_refused(api, name):
    status, body = await api.post("vfolders", body={"name": name})
    assert status == 400 and body["message"], (name, body)
    _, listing = await api.get("vfolders")
    assert listing["vfolders"] == []


@pytest.mark.parametrize(
    "body",
    [
        {"name": "q", "quota": "10XB"},
        {"name": "q", "quota": -1},
        {"name": "q", "quota": "-1"},
        {"name": "q", "type": "team"},
        {"name": "q", "cloneable": "yes please"},
        {"name": "q", "colour": "red"},
        {"name": "q", "backend": "floppy"},
    ],
)
async def test_bad_vfolder_fields_are_refused(api, body):
    status, answer = await api.post("vfolders", body=body)
    assert status == 400 and answer["message"], (body, answer)
    assert (await api.get("vfolders"))[1]["vfolders"] == []


async def test_a_quota_past_the_policy_is_refused(api):
    status, body = await api.post("vfolders", body={"name": "big", "quota": "1GiB"})
    assert status == 403 and "max_vfolder_size" in body["message"]


@pytest.mark.parametrize(
    "path", ["../../etc/passwd", "/etc/passwd", "a/../../x", "nul\x00byte", "..", "a/../.."]
)
async def test_paths_that_leave_the_vfolder_are_refused(api, path):
    await api.post("vfolders", body={"name": "safe"})
    status, body = await _upload(api, "safe", path, b"x")
    assert status == 400, (path, status, body)
    status, body = await api.get("vfolders/safe/download", params={"path": path})
    assert status == 400, (path, status, body)
    status, _ = await api.get("vfolders/safe/files", params={"path": path})
    assert status == 400
    status, _ = await api.delete("vfolders/safe/files", params={"path": path})
    assert status == 400
    status, _ = await api.post("vfolders/safe/mkdir", body={"path": path})
    assert status == 400


async def test_a_symlink_planted_inside_is_not_followed_out(api, jp_serverapp):
    await api.post("vfolders", body={"name": "trap"})
    manager = jp_serverapp.web_app.settings["gpu_sessions_engine"].manager
    (mount,) = manager.vfolders.resolve_mounts(manager.identity("alice"), ["trap"])
    os.symlink("/etc", os.path.join(mount.host_path, "escape"))  # as a kernel could
    os.symlink("/etc/passwd", os.path.join(mount.host_path, "pw"))
    _, listing = await api.get("vfolders/trap/files")
    types = {e["name"]: e["type"] for e in listing["entries"]}
    assert types == {"escape": "symlink", "pw": "symlink"}
    for path in ("escape/passwd", "pw"):
        status, _ = await api.get("vfolders/trap/download", params={"path": path})
        assert 400 <= status < 500
    status, _ = await api.get("vfolders/trap/files", params={"path": "escape"})
    assert 400 <= status < 500
    status, _ = await _upload(api, "trap", "escape/evil", b"x")
    assert 400 <= status < 500
    assert not os.path.exists("/etc/evil")
    status, _ = await api.delete("vfolders/trap/files", params={"path": "escape"})
    assert status == 204  # the link itself goes, not what it points to
    assert os.path.exists("/etc/passwd")


async def test_an_upload_past_the_quota_is_refused_with_413_and_leaves_nothing(api):
    await api.post("vfolders", body={"name": "tight", "quota": "64KiB"})
    status, _ = await _upload(api, "tight", "fits.bin", b"a" * 40_000)
    assert status == 201
    status, body = await _upload(api, "tight", "toobig.bin", b"b" * 40_000)
    assert status == 413 and body["reason"] == "quota-exceeded"
    _, listing = await api.get("vfolders/tight/files")
    assert [e["name"] for e in listing["entries"]] == ["fits.bin"]
    _, usage = await api.get("vfolders/tight/usage", params={"fresh": "true"})
    assert usage["bytes"] == 40_000


async def test_a_vfolder_deleted_to_the_trash_and_restored_has_every_file_back(api):
    await api.post("vfolders", body={"name": "keep"})
    files = {f"f{i}.txt": os.urandom(100 + i) for i in range(5)}
    await api.post("vfolders/keep/mkdir", body={"path": "sub"})
    for name, data in files.items():
        assert (await _upload(api, "keep", f"sub/{name}", data))[0] == 201
    assert (await api.delete("vfolders/keep"))[0] == 204
    assert (await api.get("vfolders"))[1]["vfolders"] == []
    _, trash = await api.get("vfolders", params={"trash": "true"})
    assert [v["name"] for v in trash["vfolders"]] == ["keep"]
    status, body = await api.post("vfolders", body={"name": "keep"})
    assert status == 409 and "restore" in body["message"]

    status, restored = await api.post("vfolders/keep/restore")
    assert status == 200 and restored["status"] == "ready"
    for name, data in files.items():
        assert await _download(api, "keep", f"sub/{name}") == data

    assert (await api.post("vfolders/keep/purge"))[0] in (400, 409)  # not in the trash
    await api.delete("vfolders/keep")
    assert (await api.post("vfolders/keep/purge"))[0] == 204
    assert (await api.post("vfolders/keep/restore"))[0] == 404


@pytest.mark.parametrize(
    "user, permission, status",
    [("bob", "admin", 400), ("alice", "ro", 400), ("nobody-known", "ro", None)],
)
async def test_bad_shares_are_refused(api, user, permission, status):
    await api.post("vfolders", body={"name": "shareme"})
    code, body = await api.post(
        "vfolders/shareme/shares", body={"user": user, "permission": permission}
    )
    assert 400 <= code < 500 and body["message"]
    if status:
        assert code == status
    _, shares = await api.get("vfolders/shareme/shares")
    assert shares["shares"] == []


async def test_project_vfolders_are_made_by_admins_for_a_group(api):
    status, body = await api.post(
        "vfolders", body={"name": "team-ds", "type": "project", "group": "ml"}
    )
    assert status == 403
    status, project = await api.post(
        "vfolders",
        user=ADMIN,
        body={"name": "team-ds", "type": "project", "group": "ml", "group_permission": "ro"},
    )
    assert status == 201
    _, listing = await api.get("vfolders", user="carol")  # carol is in ml
    assert [(v["name"], v["permission"], v["relation"]) for v in listing["vfolders"]] == [
        ("team-ds", "ro", "group")
    ]
    assert (await api.get("vfolders/team-ds", user="bob"))[0] == 404  # bob is not
    status, _ = await api.patch(
        "vfolders/team-ds/shares/carol", user=ADMIN, body={"permission": "rw"}
    )
    assert status == 200
    _, mine = await api.get("vfolders/team-ds", user="carol")
    assert mine["permission"] == "rw"
    _, alices = await api.get("vfolders/team-ds", user="alice")
    assert alices["permission"] == "ro"


async def test_clone_needs_a_cloneable_source_and_counts_against_my_quota(api):
    await api.post("vfolders", body={"name": "src"})
    await _upload(api, "src", "a.txt", b"a" * 1000)
    await api.post("vfolders/src/shares", body={"user": "bob", "permission": "ro"})
    _, inv = await api.get("vfolder-invitations", user="bob")
    await api.post(f"vfolder-invitations/{inv['received'][0]['id']}/accept", user="bob")
    status, _ = await api.post("vfolders/src/clone", user="bob", body={"name": "copy"})
    assert status == 403
    assert (await api.patch("vfolders/src", body={"cloneable": True}))[0] == 200
    status, copy = await api.post("vfolders/src/clone", user="bob", body={"name": "copy"})
    assert status == 201 and copy["owner"] == "bob" and copy["relation"] == "own"
    body = await _download(api, "copy", "a.txt", user="bob")
    assert body == b"a" * 1000


async def test_max_vfolder_count_limits_user_vfolders(api):
    status, _ = await api.put("policies/user:carol", user=ADMIN, body={"max_vfolder_count": 1})
    assert status == 200
    assert (await api.post("vfolders", user="carol", body={"name": "one"}))[0] == 201
    status, body = await api.post("vfolders", user="carol", body={"name": "two"})
    assert status == 403 and "max_vfolder_count" in body["message"]
    _, quota = await api.get("quota", user="carol")
    assert quota["usage"]["vfolder_count"] == 1


async def test_an_upload_too_large_for_the_quota_is_refused_before_its_body_is_sent(
    api, jp_http_port, jp_base_url
):
    await api.post("vfolders", body={"name": "small", "quota": "64KiB"})
    reader, writer = await asyncio.open_connection("127.0.0.1", jp_http_port)
    try:
        writer.write(
            (
                f"PUT {jp_base_url}gpu-sessions/api/vfolders/small/upload?path=big.bin HTTP/1.1\r\n"
                "Host: 127.0.0.1\r\nAuthorization: token alice-token\r\n"
                f"Content-Length: {100 << 20}\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        # Not a byte of the 100 MiB body was sent: the answer must come anyway.
        status_line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    assert b" 413 " in status_line
    _, listing = await api.get("vfolders/small/files")
    assert listing["entries"] == []


@pytest.mark.parametrize("path", ["/".join(["d"] * 300), "a" * 5000, "x" * 256])
async def test_paths_too_deep_or_too_long_are_refused(api, path):
    await api.post("vfolders", body={"name": "deep"})
    status, body = await api.post("vfolders/deep/mkdir", body={"path": path, "parents": True})
    assert status == 400 and body["message"]
    status, _ = await api.get("vfolders/deep/files", params={"path": path})
    assert status == 400
    _, listing = await api.get("vfolders/deep/files")
    assert listing["entries"] == []
