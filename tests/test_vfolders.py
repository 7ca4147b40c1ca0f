"""Vfolders: ownership, sharing, quotas, trash, files and kernel mounts, on a real SQLite store,
the real file system and real loop mounts (no Docker)."""

from __future__ import annotations

import errno
import hashlib
import os
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jupyter_gpu_sessions.core.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    PolicyViolation,
    QuotaExceeded,
)
from jupyter_gpu_sessions.core.identity import Identity
from jupyter_gpu_sessions.core.policy import Policy
from jupyter_gpu_sessions.core.vfolders import (
    Permission,
    check_vfolder_name,
    parse_mount,
)
from jupyter_gpu_sessions.store.db import make_engine, migrate
from jupyter_gpu_sessions.vfolders import VFolderService
from jupyter_gpu_sessions.vfolders.backends import directory_usage
from jupyter_gpu_sessions.vfolders.files import split_path

MiB = 1024**2
ADA = Identity("ada", frozenset({"ml"}))
BOB = Identity("bob", frozenset({"ml"}))
CY = Identity("cy", frozenset({"vision"}))
ADMIN = Identity("root", frozenset(), is_admin=True)
KNOWN = {"ada", "bob", "cy", "root"}


@pytest.fixture
def engine(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/gpu_sessions.sqlite")
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def policies() -> dict[str, Policy]:
    return {}


@pytest.fixture
def vroot(tmp_path) -> Path:
    root = tmp_path / "vfolders"
    yield root
    _release_loop_mounts(root)


@pytest.fixture
def service(engine, policies, vroot):
    svc = VFolderService(
        engine,
        policy_for=lambda user: policies.get(user, Policy()),
        known_user=lambda user: user in KNOWN,
        root=str(vroot),
    )
    yield svc
    svc.close()


def _release_loop_mounts(root: Path) -> None:
    """Unmount and detach whatever a test mounted under ``root``, even after a failure."""
    prefix = str(root) + "/"
    with open("/proc/self/mountinfo") as info:
        points = [line.split()[4] for line in info if line.split()[4].startswith(prefix)]
    for point in sorted(points, reverse=True):
        if subprocess.run(["umount", point], capture_output=True).returncode:
            subprocess.run(["umount", "-l", point], capture_output=True)
    images = root / "images"
    if images.is_dir():
        for image in images.glob("*.img"):
            out = subprocess.run(
                ["losetup", "-n", "-O", "NAME", "-j", str(image)], capture_output=True, text=True
            ).stdout
            for device in out.split():
                subprocess.run(["losetup", "-d", device], capture_output=True)


def host(service: VFolderService, who: Identity, name: str) -> Path:
    vf, _, _ = service.get(who, name)
    return Path(service.backend(vf.backend).data_path(vf))


def upload(service, who, name, path, data: bytes, **kwargs):
    return service.upload(
        who, name, path, [data[i : i + 4096] for i in range(0, len(data), 4096)], **kwargs
    )


def read(service, who, name, path) -> bytes:
    handle, size, _ = service.open_download(who, name, path)
    with handle:
        data = handle.read()
    assert len(data) == size
    return data


def tree(path: Path) -> dict[str, str]:
    """Every entry under ``path`` with a digest of its content (links by their target)."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def as_root() -> None:
    """Loop mounts (and dropping to another uid) need root: a failure, never a skip, so a
    suite run without them cannot pass for one that checked the hard quotas."""
    if os.geteuid() != 0:
        pytest.fail(
            "loopback vfolder tests need root (loop mounts): run the README's test command "
            "(scripts/test.sh) as root",
            pytrace=False,
        )


needs_root = pytest.mark.usefixtures("as_root")


# -- names, permissions, paths ------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("a/b", "slash"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        ("nul\x00", "NUL"),
        (".hidden", "starts with a dot"),
        ("x" * 65, "more than 64"),
        ("", "required"),
        ("with space", "' '"),
        ("-dash", "starts with '-'"),
        ("caf\u00e9", "'\u00e9'"),
    ],
)
def test_bad_vfolder_names_are_refused_and_nothing_is_created(service, name, says):
    with pytest.raises(InvalidRequest, match="letters, digits") as info:
        service.create(ADA, name)
    assert says in str(info.value)
    assert service.list(ADA) == []
    assert service.owner_usage("ada")["count"] == 0


@given(st.text(alphabet=string.printable + "\x00\u00e9/", max_size=80))
@settings(max_examples=300, deadline=None)
def test_every_name_accepted_is_safe_as_a_path_component(name):
    try:
        check_vfolder_name(name)
    except InvalidRequest:
        return
    assert 1 <= len(name) <= 64
    assert "/" not in name and "\x00" not in name and ".." not in name
    assert not name.startswith(".")
    assert os.path.normpath(os.path.join("/home/work", name)) == f"/home/work/{name}"


@given(st.lists(st.sampled_from(["a", "b", ".", "..", "", "c.d", "..."]), max_size=6))
@settings(max_examples=300, deadline=None)
def test_every_path_accepted_stays_inside_the_vfolder(parts):
    path = "/".join(parts)
    try:
        split = split_path(path)
    except InvalidRequest:
        assert ".." in parts or path.startswith("/")
        return
    assert ".." not in split and "" not in split and "." not in split
    joined = os.path.normpath(os.path.join("/vf", *split))
    assert joined == "/vf" or joined.startswith("/vf/")


def test_permissions_parse_order_and_lower():
    assert Permission.parse("RW") is Permission.RW
    assert Permission.lower(Permission.WD, Permission.RO) is Permission.RO
    assert Permission.RW.can_write and not Permission.RW.can_delete
    assert Permission.WD.can_delete and not Permission.RO.can_write
    assert parse_mount("team-ds:ro") == ("team-ds", Permission.RO)
    assert parse_mount("data") == ("data", None)
    for bad in ("admin", "rwx", "", "owner"):
        with pytest.raises(InvalidRequest, match="'ro'.*'rw'.*'wd'"):
            Permission.parse(bad)


def test_policy_parses_the_storage_limits():
    policy = Policy.parse(
        {"max_vfolder_count": "3", "max_vfolder_size": "1GiB", "max_vfolder_total_size": "2G"}
    )
    assert policy.max_vfolder_count == 3
    assert policy.max_vfolder_size == 1024**3
    assert policy.max_vfolder_total_size == 2 * 1000**3
    assert policy.describe("max_vfolder_size") == "1GiB"
    with pytest.raises(InvalidRequest, match="max_vfolder_size"):
        Policy.parse({"max_vfolder_size": "10XB"})
    with pytest.raises(InvalidRequest, match="max_vfolder_count"):
        Policy.parse({"max_vfolder_count": -1})


# -- ownership and visibility -------------------------------------------------------------
def test_a_new_vfolder_is_its_owners_with_every_permission(service):
    vf = service.create(ADA, "data", quota="10MiB", cloneable=True)
    assert (vf.name, vf.type, vf.owner, vf.quota, vf.status) == (
        "data",
        "user",
        "ada",
        10 * MiB,
        "ready",
    )
    (listed,) = service.list(ADA)
    assert listed["id"] == vf.id and listed["permission"] == "wd" and listed["relation"] == "own"
    assert service.get(ADA, vf.id)[0] == vf
    assert host(service, ADA, "data").is_dir()
    assert service.resolve_mounts(ADA, ["data"])[0].container_path == "/home/work/data"


def test_two_users_cannot_see_each_others_vfolders_unless_shared(service):
    service.create(ADA, "secret")
    upload(service, ADA, "secret", "plan.txt", b"top secret")
    missing = str(_raises(NotFound, service.get, BOB, "nosuch").value).replace("nosuch", "X")
    attempts = [
        lambda: service.get(BOB, "secret"),
        lambda: service.usage(BOB, "secret"),
        lambda: service.list_files(BOB, "secret", ""),
        lambda: service.open_download(BOB, "secret", "plan.txt"),
        lambda: upload(service, BOB, "secret", "x", b"x"),
        lambda: service.mkdir(BOB, "secret", "x"),
        lambda: service.delete_file(BOB, "secret", "plan.txt"),
        lambda: service.update(BOB, "secret", cloneable=True),
        lambda: service.delete(BOB, "secret"),
        lambda: service.invite(BOB, "secret", "cy", "ro"),
        lambda: service.clone(BOB, "secret", "mine"),
        lambda: service.shares(BOB, "secret"),
    ]
    for attempt in attempts:
        info = _raises(NotFound, attempt)
        # Same words as for a vfolder that does not exist: existence is not revealed.
        assert str(info.value).replace("secret", "X") == missing
    with pytest.raises(NotFound, match="'secret'"):
        service.resolve_mounts(BOB, ["secret"])
    assert service.list(BOB) == []
    assert service.get(ADA, "secret")[1] is Permission.WD  # nothing changed

    share = service.invite(ADA, "secret", "bob", "ro")
    assert service.list(BOB) == []  # not before accepting
    service.accept(BOB, share.id)
    (seen,) = service.list(BOB)
    assert (seen["name"], seen["relation"], seen["permission"]) == ("secret", "shared", "ro")
    assert read(service, BOB, "secret", "plan.txt") == b"top secret"
    assert service.list(CY) == []


def test_ro_share_cannot_be_written(service):
    service.create(ADA, "data")
    upload(service, ADA, "data", "a.txt", b"hello")
    service.accept(BOB, service.invite(ADA, "data", "bob", "ro").id)
    assert [e.name for e in service.list_files(BOB, "data", "")] == ["a.txt"]
    assert read(service, BOB, "data", "a.txt") == b"hello"
    for attempt, needs in [
        (lambda: upload(service, BOB, "data", "a.txt", b"changed"), "read-write"),
        (lambda: upload(service, BOB, "data", "b.txt", b"new"), "read-write"),
        (lambda: service.mkdir(BOB, "data", "dir"), "read-write"),
        (lambda: service.delete_file(BOB, "data", "a.txt"), "read-write-delete"),
    ]:
        with pytest.raises(Forbidden, match=f"read-only \\(ro\\) access.*{needs}"):
            attempt()
    assert tree(host(service, ADA, "data")) == {"a.txt": hashlib.sha256(b"hello").hexdigest()}
    (mount,) = service.resolve_mounts(BOB, ["data"])
    assert mount.read_only and mount.permission is Permission.RO
    with pytest.raises(Forbidden, match="read-only \\(ro\\) access; ask for 'data:ro'"):
        service.resolve_mounts(BOB, ["data:rw"])


def test_rw_share_writes_but_only_wd_deletes(service):
    service.create(ADA, "data")
    service.accept(BOB, service.invite(ADA, "data", "bob", "rw").id)
    upload(service, BOB, "data", "b.txt", b"from bob")
    service.mkdir(BOB, "data", "out")
    with pytest.raises(Forbidden, match="read-write-delete"):
        service.delete_file(BOB, "data", "b.txt")
    service.set_permission(ADA, "data", "bob", "wd")
    service.delete_file(BOB, "data", "b.txt")
    assert [e.name for e in service.list_files(ADA, "data", "")] == ["out"]


def test_invitations_are_accepted_or_declined_by_the_invitee_only(service):
    service.create(ADA, "data")
    share = service.invite(ADA, "data", "bob", "ro")
    assert share.state == "invited" and share.invited_by == "ada"
    again = service.invite(ADA, "data", "bob", "rw")  # re-inviting updates it
    assert again.id == share.id and again.permission is Permission.RW
    box = service.invitations(BOB)
    assert [(i["vfolder_name"], i["permission"]) for i in box["received"]] == [("data", "rw")]
    assert [i["user"] for i in service.invitations(ADA)["sent"]] == ["bob"]
    with pytest.raises(NotFound, match="no invitation"):
        service.accept(CY, share.id)
    with pytest.raises(NotFound, match="no invitation"):
        service.accept(BOB, "f" * 32)
    service.decline(BOB, share.id)
    assert service.list(BOB) == []
    with pytest.raises(Conflict, match="invite you again"):
        service.accept(BOB, share.id)
    assert service.invite(ADA, "data", "bob", "ro").state == "invited"
    assert service.accept(BOB, share.id).state == "accepted"
    assert service.get(BOB, "data")[1] is Permission.RO
    # Declining later leaves the share.
    service.decline(BOB, share.id)
    with pytest.raises(NotFound):
        service.get(BOB, "data")


def test_the_owner_changes_and_revokes_a_permission(service):
    service.create(ADA, "data")
    service.accept(BOB, service.invite(ADA, "data", "bob", "ro").id)
    service.set_permission(ADA, "data", "bob", "rw")
    assert service.get(BOB, "data")[1] is Permission.RW
    assert [(s.user, s.permission) for s in service.shares(ADA, "data")] == [("bob", Permission.RW)]
    assert [s.user for s in service.shares(BOB, "data")] == ["bob"]
    with pytest.raises(NotFound, match="invite them first"):
        service.set_permission(ADA, "data", "cy", "ro")
    service.revoke(ADA, "data", "bob")
    with pytest.raises(NotFound):
        service.get(BOB, "data")
    with pytest.raises(NotFound, match="not shared with 'bob'"):
        service.revoke(ADA, "data", "bob")


def test_a_recipient_cannot_manage_the_vfolder(service):
    service.create(ADA, "data")
    service.accept(BOB, service.invite(ADA, "data", "bob", "wd").id)
    for attempt in [
        lambda: service.delete(BOB, "data"),
        lambda: service.update(BOB, "data", new_name="mine"),
        lambda: service.invite(BOB, "data", "cy", "ro"),
        lambda: service.set_permission(BOB, "data", "bob", "wd"),
        lambda: service.revoke(BOB, "data", "bob"),
    ]:
        with pytest.raises(Forbidden, match=r"only its owner \(ada\)"):
            attempt()
    assert service.get(ADA, "data")[0].status == "ready"


@pytest.mark.parametrize(
    ("user", "error", "says"),
    [
        ("ada", InvalidRequest, "with yourself"),
        ("nobody", InvalidRequest, "no user 'nobody' is known"),
        ("", InvalidRequest, "not a user name"),
    ],
)
def test_sharing_with_yourself_or_an_unknown_user_is_refused(service, user, error, says):
    service.create(ADA, "data")
    with pytest.raises(error, match=says):
        service.invite(ADA, "data", user, "ro")
    assert service.shares(ADA, "data") == []


@pytest.mark.parametrize("permission", ["admin", "owner", "rwx", ""])
def test_a_permission_that_does_not_exist_is_refused(service, permission):
    service.create(ADA, "data")
    with pytest.raises(InvalidRequest, match="'ro' \\(read-only\\)"):
        service.invite(ADA, "data", "bob", permission)
    with pytest.raises(InvalidRequest, match="'wd'"):
        service.resolve_mounts(ADA, [f"data:{permission}" if permission else "data:"])
    with pytest.raises(InvalidRequest, match="group_permission"):
        service.create(ADMIN, "p", type="project", group="ml", group_permission=permission)
    assert service.shares(ADA, "data") == []


# -- project vfolders ---------------------------------------------------------------------
def test_a_project_vfolder_gives_its_group_a_default_with_per_user_overrides(service):
    with pytest.raises(Forbidden, match="only admins"):
        service.create(ADA, "team", type="project", group="ml")
    with pytest.raises(InvalidRequest, match="needs the group"):
        service.create(ADMIN, "team", type="project")
    vf = service.create(ADMIN, "team", type="project", group="ml", group_permission="ro")
    assert (vf.owner, vf.group, vf.group_permission) == ("root", "ml", Permission.RO)
    assert service.get(ADA, "team")[1:] == (Permission.RO, "group")
    assert service.get(BOB, "team")[1:] == (Permission.RO, "group")
    with pytest.raises(NotFound):
        service.get(CY, "team")
    service.set_permission(ADMIN, "team", "ada", "wd")  # an override: no invitation
    assert service.get(ADA, "team")[1] is Permission.WD
    assert service.get(BOB, "team")[1] is Permission.RO
    service.set_permission(ADMIN, "team", "cy", "ro")  # a non-member let in by an admin
    assert service.get(CY, "team")[1:] == (Permission.RO, "shared")
    service.update(ADMIN, "team", group_permission="rw")
    assert service.get(BOB, "team")[1] is Permission.RW
    with pytest.raises(Forbidden, match="only admins"):
        service.delete(ADA, "team")
    service.revoke(ADMIN, "team", "ada")
    assert service.get(ADA, "team")[1] is Permission.RW
    # Another group may use the same name.
    service.create(ADMIN, "team", type="project", group="vision")
    assert service.get(CY, "team")[0].group == "vision"
    with pytest.raises(Conflict, match="group 'ml' already has"):
        service.create(ADMIN, "team", type="project", group="ml")


def test_names_that_mean_several_vfolders_need_the_id(service):
    a = service.create(ADA, "data")
    b = service.create(BOB, "data")
    for who, name in ((ADA, "data"), (BOB, "data")):
        service.accept(CY, service.invite(who, name, "cy", "ro").id)
    with pytest.raises(Conflict, match=f"use the id.*|{a.id}"):
        service.get(CY, "data")
    assert service.get(CY, a.id)[0].owner == "ada"
    assert service.get(CY, b.id)[0].owner == "bob"
    # Your own comes first: ada's "data" is hers even when bob's is shared with her.
    service.accept(ADA, service.invite(BOB, "data", "ada", "ro").id)
    assert service.get(ADA, "data")[0].id == a.id


# -- update, trash, purge -----------------------------------------------------------------
def test_rename_and_flags_are_changed_by_the_owner(service):
    service.create(ADA, "data")
    service.create(ADA, "other")
    with pytest.raises(Conflict, match="already has a vfolder named 'other'"):
        service.update(ADA, "data", new_name="other")
    with pytest.raises(InvalidRequest, match="'..'"):
        service.update(ADA, "data", new_name="../x")
    with pytest.raises(InvalidRequest, match="project vfolders only"):
        service.update(ADA, "data", group_permission="ro")
    vf = service.update(ADA, "data", new_name="renamed", cloneable=True, quota="1GiB")
    assert (vf.name, vf.cloneable, vf.quota) == ("renamed", True, 1024**3)
    with pytest.raises(NotFound):
        service.get(ADA, "data")


def test_a_vfolder_deleted_to_the_trash_and_restored_has_every_file_back(service):
    service.create(ADA, "data")
    service.accept(BOB, service.invite(ADA, "data", "bob", "ro").id)
    service.mkdir(ADA, "data", "a/b/c", parents=True)
    for i in range(20):
        upload(service, ADA, "data", f"a/b/c/f{i}.bin", os.urandom(1000 + i))
    upload(service, ADA, "data", "top.txt", b"top")
    before = tree(host(service, ADA, "data"))
    with pytest.raises(Forbidden, match="decline its share"):
        service.delete(BOB, "data")
    service.delete(ADA, "data")
    assert service.list(ADA) == [] and service.list(BOB) == []
    assert [t["name"] for t in service.list_trash(ADA)] == ["data"]
    assert service.list_trash(BOB) == []
    with pytest.raises(NotFound, match="in your trash"):
        service.list_files(ADA, "data", "")
    with pytest.raises(NotFound, match="in your trash: restore it first"):
        service.resolve_mounts(ADA, ["data"])
    with pytest.raises(Conflict, match="in the trash: restore it"):
        service.create(ADA, "data")
    with pytest.raises(NotFound):
        service.restore(BOB, "data")
    service.restore(ADA, "data")
    assert tree(host(service, ADA, "data")) == before
    assert service.get(BOB, "data")[1] is Permission.RO  # shares come back too


def test_purge_deletes_for_good_and_only_from_the_trash(service):
    vf = service.create(ADA, "data")
    service.invite(ADA, "data", "bob", "ro")
    upload(service, ADA, "data", "x.bin", b"x" * 1000)
    path = host(service, ADA, "data")
    with pytest.raises(Conflict, match="not in the trash.*delete it first"):
        service.purge(ADA, "data")
    with pytest.raises(Conflict, match="not in the trash"):
        service.restore(ADA, "data")
    service.delete(ADA, "data")
    with pytest.raises(NotFound):
        service.purge(BOB, "data")
    service.purge(ADA, "data")
    assert not path.exists()
    assert service.store.get(vf.id) is None
    assert service.store.shares_of(vf.id) == []
    assert service.invitations(BOB)["received"] == []
    assert service.list_trash(ADA) == []
    service.create(ADA, "data")  # the name is free again


def test_max_vfolder_count_counts_the_trash_until_purged(service, policies):
    policies["ada"] = Policy(max_vfolder_count=2)
    service.create(ADA, "one")
    service.create(ADA, "two")
    with pytest.raises(PolicyViolation, match="max_vfolder_count = 2"):
        service.create(ADA, "three")
    service.delete(ADA, "two")
    with pytest.raises(PolicyViolation, match="trash counts"):
        service.create(ADA, "three")
    service.purge(ADA, "two")
    service.create(ADA, "three")
    # Project vfolders and other people's do not count.
    service.create(ADMIN, "team", type="project", group="ml")
    service.create(BOB, "one")
    assert service.owner_usage("ada")["count"] == 2


def test_concurrent_creates_never_pass_max_vfolder_count(service, policies):
    policies["ada"] = Policy(max_vfolder_count=3)
    errors: list[Exception] = []

    def create(i: int) -> None:
        try:
            service.create(ADA, f"v{i}")
        except PolicyViolation as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(service.list(ADA)) == 3 and len(errors) == 5
    assert len(os.listdir(service.root + "/dirs")) == 3


# -- quotas -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("quota", "says"),
    [
        ("10XB", "unknown unit 'XB'"),
        ("-1", "is not a size"),
        (-1, "too small"),
        (0, "too small"),
        ("lots", "is not a size"),
        (1.5, "whole number"),
        (True, "not a size"),
    ],
)
def test_bad_sizes_are_refused_and_nothing_is_created(service, quota, says):
    with pytest.raises(InvalidRequest, match=says):
        service.create(ADA, "data", quota=quota)
    assert service.owner_usage("ada")["count"] == 0
    service.create(ADA, "data")
    with pytest.raises(InvalidRequest, match=says):
        service.update(ADA, "data", quota=quota)
    assert service.get(ADA, "data")[0].quota is None


def test_a_quota_over_the_policy_is_refused_and_the_policy_is_the_default(service, policies):
    policies["ada"] = Policy(max_vfolder_size=100 * MiB)
    with pytest.raises(PolicyViolation, match="max_vfolder_size = 100MiB"):
        service.create(ADA, "data", quota="1GiB")
    assert service.create(ADA, "data").quota == 100 * MiB
    with pytest.raises(PolicyViolation):
        service.update(ADA, "data", quota="101MiB")


def test_upload_past_the_quota_is_refused_and_leaves_nothing(service):
    service.create(ADA, "data", quota=100_000)
    upload(service, ADA, "data", "keep.bin", b"k" * 60_000)
    path = host(service, ADA, "data")
    before = tree(path)
    # Refused before writing, from the announced size.
    with pytest.raises(QuotaExceeded, match="uses 58.6KiB of its 97.7KiB quota"):
        upload(service, ADA, "data", "big.bin", b"b" * 50_000, size_hint=50_000)
    # Refused while streaming, before the byte that would pass it.
    written = []

    def chunks():
        for _ in range(100):
            written.append(1000)
            yield b"s" * 1000

    with pytest.raises(QuotaExceeded, match="would pass the quota"):
        service.upload(ADA, "data", "stream.bin", chunks())
    assert sum(written) <= 41_000
    # Overwriting a file in place with something too large keeps the old file.
    with pytest.raises(QuotaExceeded):
        upload(service, ADA, "data", "keep.bin", b"n" * 110_000)
    assert tree(path) == before
    assert directory_usage(str(path)) == 60_000
    # Replacing a file credits its old size.
    upload(service, ADA, "data", "keep.bin", b"r" * 99_000)
    assert read(service, ADA, "data", "keep.bin") == b"r" * 99_000


def test_owner_total_size_limits_uploads_across_vfolders(service, policies):
    policies["ada"] = Policy(max_vfolder_total_size=100_000)
    service.create(ADA, "one")
    service.create(ADA, "two")
    upload(service, ADA, "one", "a.bin", b"a" * 70_000)
    with pytest.raises(QuotaExceeded, match="max_vfolder_total_size"):
        upload(service, ADA, "two", "b.bin", b"b" * 40_000)
    assert service.list_files(ADA, "two", "") == []
    upload(service, ADA, "two", "b.bin", b"b" * 30_000)
    assert service.owner_usage("ada") == {"count": 2, "bytes": 100_000}
    # A recipient's upload counts against the owner.
    service.accept(BOB, service.invite(ADA, "one", "bob", "rw").id)
    with pytest.raises(QuotaExceeded, match="ada stores"):
        upload(service, BOB, "one", "c.bin", b"c")


def test_a_vfolder_over_its_quota_is_mounted_read_only_until_under_again(service):
    service.create(ADA, "data", quota=10_000)
    path = host(service, ADA, "data")
    (path / "from-kernel.bin").write_bytes(b"k" * 20_000)  # a kernel writes past it
    (mount,) = service.resolve_mounts(ADA, ["data"])
    assert mount.read_only and mount.permission is Permission.WD
    assert "more than its 9.8KiB quota" in mount.reason
    service.delete_file(ADA, "data", "from-kernel.bin")
    (mount,) = service.resolve_mounts(ADA, ["data"])
    assert not mount.read_only and mount.reason == ""


def test_shrinking_below_usage_is_refused(service):
    service.create(ADA, "data", quota="1MiB")
    upload(service, ADA, "data", "a.bin", b"a" * 500_000)
    with pytest.raises(Conflict, match="delete files first"):
        service.update(ADA, "data", quota=100_000)
    assert service.get(ADA, "data")[0].quota == MiB


# -- files and path safety ----------------------------------------------------------------
def test_files_are_listed_uploaded_downloaded_and_deleted(service):
    service.create(ADA, "data")
    service.mkdir(ADA, "data", "results")
    with pytest.raises(Conflict, match="already exists"):
        service.mkdir(ADA, "data", "results")
    entry = upload(service, ADA, "data", "results/r.csv", b"a,b\n1,2\n")
    assert (entry.name, entry.type, entry.size) == ("r.csv", "file", 8)
    with pytest.raises(Conflict, match="overwrite=True"):
        upload(service, ADA, "data", "results/r.csv", b"other", overwrite=False)
    assert read(service, ADA, "data", "results/r.csv") == b"a,b\n1,2\n"
    assert [(e.name, e.type) for e in service.list_files(ADA, "data", ".")] == [("results", "dir")]
    assert [e.name for e in service.list_files(ADA, "data", "results/")] == ["r.csv"]
    with pytest.raises(NotFound, match="no 'nope'"):
        service.list_files(ADA, "data", "nope")
    with pytest.raises(InvalidRequest, match="is a directory"):
        service.open_download(ADA, "data", "results")
    with pytest.raises(Conflict, match="recursive=True"):
        service.delete_file(ADA, "data", "results")
    with pytest.raises(InvalidRequest, match="root cannot be deleted"):
        service.delete_file(ADA, "data", "")
    service.delete_file(ADA, "data", "results", recursive=True)
    assert service.list_files(ADA, "data", "") == []
    # An upload that fails mid-stream leaves nothing.

    def broken():
        yield b"partial"
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        service.upload(ADA, "data", "x.bin", broken())
    assert os.listdir(host(service, ADA, "data")) == []


@pytest.mark.parametrize(
    "path", ["../../etc/passwd", "/etc/passwd", "a/../../b", "a\x00b", "..", "./../x"]
)
def test_paths_that_leave_the_vfolder_are_refused(service, path):
    service.create(ADA, "data")
    service.mkdir(ADA, "data", "a")
    for attempt in [
        lambda: service.list_files(ADA, "data", path),
        lambda: service.open_download(ADA, "data", path),
        lambda: upload(service, ADA, "data", path, b"x"),
        lambda: service.mkdir(ADA, "data", path),
        lambda: service.delete_file(ADA, "data", path, recursive=True),
    ]:
        with pytest.raises(InvalidRequest, match="relative to the vfolder's root"):
            attempt()
    assert tree(host(service, ADA, "data")) == {"a": "dir"}


def test_a_symlink_planted_inside_is_never_followed_out(service, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"not yours")
    service.create(ADA, "data", quota=1000)
    path = host(service, ADA, "data")
    # What a kernel could do inside its mount.
    os.symlink(outside, path / "out")
    os.symlink(outside / "secret.txt", path / "secret.txt")
    os.symlink("..", path / "up")
    os.mkfifo(path / "fifo")
    entries = {e.name: e.type for e in service.list_files(ADA, "data", "")}
    assert entries == {"out": "symlink", "secret.txt": "symlink", "up": "symlink", "fifo": "other"}
    link = "symbolic link"
    for attempt in [
        lambda: service.list_files(ADA, "data", "out"),
        lambda: service.list_files(ADA, "data", "up"),
        lambda: service.open_download(ADA, "data", "secret.txt"),
        lambda: service.open_download(ADA, "data", "out/secret.txt"),
        lambda: upload(service, ADA, "data", "out/new.txt", b"x"),
        lambda: upload(service, ADA, "data", "secret.txt", b"overwrite"),
        lambda: service.mkdir(ADA, "data", "out/sub"),
        lambda: service.mkdir(ADA, "data", "out/sub", parents=True),
        lambda: service.delete_file(ADA, "data", "out/secret.txt"),
        lambda: service.delete_file(ADA, "data", "up/outside", recursive=True),
    ]:
        with pytest.raises(InvalidRequest, match=link):
            attempt()
    with pytest.raises(InvalidRequest, match="not a file"):
        service.open_download(ADA, "data", "fifo")  # never blocks on a FIFO
    # The link's target is neither counted nor copied.
    (outside / "big.bin").write_bytes(b"b" * 5000)
    assert service.usage(ADA, "data", fresh=True) == 0
    assert not service.resolve_mounts(ADA, ["data"])[0].read_only
    clone = service.clone(ADA, "data", "copy")
    copied = Path(service.backend(clone.backend).data_path(clone))
    assert os.readlink(copied / "out") == str(outside)
    assert not (copied / "fifo").exists()
    # Deleting the link itself is fine and leaves its target alone.
    service.delete_file(ADA, "data", "out")
    service.delete_file(ADA, "data", "up")
    assert (outside / "secret.txt").read_bytes() == b"not yours"
    assert sorted(os.listdir(outside)) == ["big.bin", "secret.txt"]


def test_directory_usage_counts_regular_files_only(tmp_path):
    root = tmp_path / "v"
    for d in range(20):
        sub = root / f"d{d}" / "deeper"
        sub.mkdir(parents=True)
        for f in range(50):
            (sub / f"f{f}").write_bytes(b"x" * f)
    os.symlink("/usr", root / "usr")
    os.link(root / "d0" / "deeper" / "f10", root / "hard")
    assert directory_usage(str(root)) == 20 * sum(range(50)) + 10
    assert directory_usage(str(tmp_path / "missing")) == 0


# -- clone --------------------------------------------------------------------------------
def test_clone_copies_files_and_counts_against_the_cloners_quotas(service, policies):
    service.create(ADA, "src", cloneable=False)
    service.mkdir(ADA, "src", "d")
    upload(service, ADA, "src", "d/a.bin", b"a" * 30_000)
    upload(service, ADA, "src", "b.bin", b"b" * 20_000)
    service.accept(BOB, service.invite(ADA, "src", "bob", "ro").id)
    with pytest.raises(Forbidden, match="not cloneable"):
        service.clone(BOB, "src", "mine")
    service.update(ADA, "src", cloneable=True)
    with pytest.raises(QuotaExceeded, match="at least 48.8KiB"):
        service.clone(BOB, "src", "mine", quota=40_000)
    policies["bob"] = Policy(max_vfolder_total_size=60_000)
    service.create(BOB, "own")
    upload(service, BOB, "own", "x.bin", b"x" * 20_000)
    with pytest.raises(QuotaExceeded, match="max_vfolder_total_size"):
        service.clone(BOB, "src", "mine")
    policies["bob"] = Policy(max_vfolder_count=1)
    with pytest.raises(PolicyViolation, match="max_vfolder_count"):
        service.clone(BOB, "src", "mine")
    assert service.owner_usage("bob") == {"count": 1, "bytes": 20_000}
    policies["bob"] = Policy()
    clone = service.clone(BOB, "src", "mine", quota="1MiB")
    assert (clone.owner, clone.type, clone.quota, clone.cloneable) == ("bob", "user", MiB, False)
    assert tree(host(service, BOB, "mine")) == tree(host(service, ADA, "src"))
    assert service.get(BOB, "mine")[1:] == (Permission.WD, "own")
    with pytest.raises(Conflict, match="already has a vfolder named 'mine'"):
        service.clone(BOB, "src", "mine")


# -- kernel mounts ------------------------------------------------------------------------
def test_resolve_mounts_lowers_permissions_and_refuses_clearly(service):
    service.create(ADA, "data")
    service.create(ADA, "scratch")
    service.create(BOB, "team-ds")
    service.accept(ADA, service.invite(BOB, "team-ds", "ada", "rw").id)
    mounts = service.resolve_mounts(ADA, ["data", "team-ds:ro", "scratch:rw"])
    assert [(m.name, m.container_path, m.permission, m.read_only) for m in mounts] == [
        ("data", "/home/work/data", Permission.WD, False),
        ("team-ds", "/home/work/team-ds", Permission.RO, True),
        ("scratch", "/home/work/scratch", Permission.RW, False),
    ]
    assert mounts[0].host_path == str(host(service, ADA, "data"))
    with pytest.raises(Forbidden, match="'team-ds'.*read-write \\(rw\\) access"):
        service.resolve_mounts(ADA, ["team-ds:wd"])
    with pytest.raises(NotFound, match="'nope'.*you can mount: data, scratch, team-ds"):
        service.resolve_mounts(ADA, ["data", "nope"])
    with pytest.raises(NotFound, match="none yet"):
        service.resolve_mounts(CY, ["data"])
    with pytest.raises(InvalidRequest, match="more than once"):
        service.resolve_mounts(ADA, ["data", "data:ro"])
    with pytest.raises(InvalidRequest, match="must be a list"):
        service.resolve_mounts(ADA, "data")
    with pytest.raises(InvalidRequest, match="'..'"):
        service.resolve_mounts(ADA, ["../etc"])
    assert service.resolve_mounts(ADA, []) == []


# -- loopback -----------------------------------------------------------------------------
@needs_root
def test_loopback_vfolder_is_a_hard_limit(service):
    vf = service.create(ADA, "hard", quota="16MiB", backend="loopback")
    path = host(service, ADA, "hard")
    assert os.path.ismount(path.parent)
    # Most of a small image is usable.
    free = service.backend("loopback").free(vf)
    assert free > 12 * MiB
    keep = os.urandom(4 * MiB)
    (path / "keep.bin").write_bytes(keep)
    with pytest.raises(OSError) as info, open(path / "flood.bin", "wb") as flood:
        for _ in range(32):
            flood.write(b"\0" * MiB)
            flood.flush()
            os.fsync(flood.fileno())
    assert info.value.errno == errno.ENOSPC
    assert (path / "keep.bin").read_bytes() == keep
    os.unlink(path / "flood.bin")
    # The service refuses too, with 413 words, and leaves nothing.
    with pytest.raises(QuotaExceeded, match="free of its 16MiB quota"):
        upload(service, ADA, "hard", "big.bin", b"\0" * (20 * MiB))
    assert sorted(os.listdir(path)) == ["keep.bin"]
    assert read(service, ADA, "hard", "keep.bin") == keep


@needs_root
def test_a_loopback_vfolder_grows_keeping_its_files_but_never_shrinks(service):
    service.create(ADA, "hard", quota="16MiB", backend="loopback")
    path = host(service, ADA, "hard")
    keep = os.urandom(MiB)
    (path / "keep.bin").write_bytes(keep)
    with pytest.raises(Conflict, match="can only grow"):
        service.update(ADA, "hard", quota="8MiB")
    vf = service.update(ADA, "hard", quota="48MiB")
    assert vf.quota == 48 * MiB
    assert service.backend("loopback").free(vf) > 40 * MiB
    assert (host(service, ADA, "hard") / "keep.bin").read_bytes() == keep
    upload(service, ADA, "hard", "more.bin", b"m" * (30 * MiB))


@needs_root
def test_loopback_vfolders_are_mounted_again_after_a_reboot_and_purged_completely(service):
    vf = service.create(ADA, "hard", quota="16MiB", backend="loopback")
    upload(service, ADA, "hard", "keep.txt", b"survives")
    mountpoint = host(service, ADA, "hard").parent
    subprocess.run(["umount", str(mountpoint)], check=True)  # what a reboot does
    assert not os.path.ismount(mountpoint)
    service.ensure_ready()
    assert os.path.ismount(mountpoint)
    assert read(service, ADA, "hard", "keep.txt") == b"survives"
    image = Path(service.root) / "images" / f"{vf.id}.img"
    service.delete(ADA, "hard")
    service.purge(ADA, "hard")
    assert not image.exists() and not mountpoint.exists()
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert vf.id not in losetup


def test_loopback_needs_a_quota(service):
    with pytest.raises(InvalidRequest, match="loopback vfolder needs a quota"):
        service.create(ADA, "hard", backend="loopback")
    with pytest.raises(InvalidRequest, match="backend 'nfs' is not known"):
        service.create(ADA, "x", backend="nfs")
    assert service.list(ADA) == []


def _raises(error, fn, *args):
    with pytest.raises(error) as info:
        fn(*args)
    return info


@needs_root
def test_a_loopback_vfolder_in_use_by_a_kernel_is_not_grown_offline(service, vroot):
    service.create(ADA, "hard", quota="16MiB", backend="loopback")
    path = host(service, ADA, "hard")
    (path / "keep.txt").write_bytes(b"kept")
    # A process in its own mount namespace holds the mount, as a kernel's container does.
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sleep", "60"],
    )
    try:
        _wait_for_namespace(holder.pid)
        try:
            vf = service.update(ADA, "hard", quota="32MiB")
        except Conflict as exc:  # this host cannot grow a mounted ext4 (no CAP_SYS_RESOURCE)
            assert "stop the kernels that use it" in str(exc)
            assert service.get(ADA, "hard")[0].quota == 16 * MiB
        else:  # online growth worked
            assert vf.quota == 32 * MiB
        assert (host(service, ADA, "hard") / "keep.txt").read_bytes() == b"kept"
        assert os.path.ismount(path.parent)
    finally:
        holder.kill()
        holder.wait()
    # Once no namespace holds it, it grows. Another process's container created while the
    # vfolder was mounted (a concurrent test's kernel) holds a copy of the mount until that
    # container ends: the growth is refused, saying so, until then.
    deadline = time.monotonic() + 180
    while True:
        try:
            grown = service.update(ADA, "hard", quota="32MiB")
            break
        except Conflict as exc:
            assert "stop the kernels that use it" in str(exc)
            assert time.monotonic() < deadline, "the vfolder stayed mounted elsewhere"
            time.sleep(1)
    assert grown.quota == 32 * MiB
    assert (host(service, ADA, "hard") / "keep.txt").read_bytes() == b"kept"


def _wait_for_namespace(pid: int) -> None:
    for _ in range(100):
        try:
            if os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"):
                if "sleep" in Path(f"/proc/{pid}/cmdline").read_text():
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("the namespace holder did not start")


def test_a_creation_whose_process_died_is_undone_at_start_but_a_live_one_is_not(service):
    dead = service.create(ADA, "dead")
    live = service.create(ADA, "live")
    for vf in (dead, live):
        service.store.set_status(vf.id, "creating", expect=("ready",))
    lock = Path(service.root) / "locks" / f"{live.id}.busy"
    holder = subprocess.Popen(
        [
            "python3",
            "-c",
            "import fcntl,sys,time; f=open(sys.argv[1],'a'); fcntl.flock(f,fcntl.LOCK_EX); "
            "print('locked',flush=True); time.sleep(60)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        service.ensure_ready()
        assert service.store.get(dead.id) is None
        assert not os.path.exists(Path(service.root) / "dirs" / dead.id)
        assert service.store.get(live.id).status == "creating"
        assert os.path.isdir(Path(service.root) / "dirs" / live.id)
    finally:
        holder.kill()
        holder.wait()
    service.ensure_ready()
    assert service.store.get(live.id) is None


def test_concurrent_uploads_never_pass_the_quota_together(service):
    service.create(ADA, "data", quota=100_000)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def chunks():
        barrier.wait()
        for _ in range(40):
            yield b"x" * 1000

    def run(i):
        try:
            service.upload(ADA, "data", f"f{i}.bin", chunks())
            outcomes.append("ok")
        except QuotaExceeded:
            outcomes.append("refused")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Together they never pass the quota. How many fit depends on when a refused upload
    # gives its reservation back: two when it does so at once, one when the threads' other
    # refusals come first (a loaded machine). Never three.
    ok = outcomes.count("ok")
    assert ok in (1, 2) and outcomes.count("refused") == 4 - ok
    assert directory_usage(str(host(service, ADA, "data"))) == 40_000 * ok <= 100_000
    assert len(os.listdir(host(service, ADA, "data"))) == ok


def test_concurrent_uploads_that_fit_one_after_another_do_not_all_fail(service):
    """The youngest uploads give way to the older ones when the room runs out, so of four
    40 kB uploads into 100 kB exactly two land, however the threads interleave."""
    service.create(ADA, "data", quota=100_000)
    for attempt in range(5):
        barrier = threading.Barrier(4)
        outcomes: list[str] = []

        def chunks(barrier=barrier):
            barrier.wait()
            for _ in range(40):
                yield b"x" * 1000

        def run(i, attempt=attempt, outcomes=outcomes, chunks=chunks):
            try:
                service.upload(ADA, "data", f"r{attempt}-{i}.bin", chunks())
                outcomes.append("ok")
            except QuotaExceeded:
                outcomes.append("refused")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["ok", "ok", "refused", "refused"]
        assert directory_usage(str(host(service, ADA, "data"))) == 80_000
        for name in os.listdir(host(service, ADA, "data")):
            service.delete_file(ADA, "data", name)


def test_an_upload_that_must_not_overwrite_creates_a_new_file(service):
    service.create(ADA, "data")
    entry = upload(service, ADA, "data", "new.txt", b"fresh", overwrite=False)
    assert (entry.name, entry.size) == ("new.txt", 5)
    assert read(service, ADA, "data", "new.txt") == b"fresh"
    assert os.listdir(host(service, ADA, "data")) == ["new.txt"]


@needs_root
def test_an_image_still_mounted_by_a_kernel_is_never_attached_twice(service):
    vf = service.create(ADA, "hard", quota="16MiB", backend="loopback")
    path = host(service, ADA, "hard")
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "60"])
    try:
        _wait_for_namespace(holder.pid)
        subprocess.run(["umount", str(path.parent)], check=True)  # the host lost its mount
        service.ensure_ready()
        image = Path(service.root) / "images" / f"{vf.id}.img"
        devices = subprocess.run(
            ["losetup", "-n", "-O", "NAME", "-j", str(image)], capture_output=True, text=True
        ).stdout.split()
        assert len(devices) == 1  # mounted again through the same loop device
        upload(service, ADA, "hard", "after.txt", b"one file system")
        assert (path / "after.txt").read_bytes() == b"one file system"
        assert isinstance(service.list(ADA)[0]["usage"], int)
    finally:
        holder.kill()
        holder.wait()


def test_the_vfolder_root_is_private_to_the_server(service):
    service.create(ADA, "data")
    assert os.stat(service.root).st_mode & 0o077 == 0


@needs_root
def test_loopback_without_root_says_to_run_as_root_or_use_directories():
    script = (
        "from jupyter_gpu_sessions.vfolders.backends import LoopbackBackend\n"
        "LoopbackBackend.check_available()\n"
    )
    done = subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable]
        + ["-c", script],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert done.returncode != 0
    assert "RuntimeUnavailable" in done.stderr and "use the directory backend" in done.stderr


# -- failures midway: nothing left behind, nothing still reserved -------------------------
@pytest.fixture
def tiny_disk(tmp_path) -> Path:
    """A 1 MiB tmpfs: a file system that really fills up (mounting it needs root)."""
    disk = tmp_path / "tiny"
    disk.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        why = f"cannot mount a 1 MiB tmpfs to fill up ({done.stderr.strip()})"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{why}: CI runs the tests as root", pytrace=False)
        pytest.skip(why)
    yield disk
    if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.fixture
def tiny_service(engine, policies, tiny_disk):
    """A service whose vfolders live on ``tiny_disk``."""
    svc = VFolderService(
        engine,
        policy_for=lambda user: policies.get(user, Policy()),
        known_user=lambda user: user in KNOWN,
        root=str(tiny_disk / "vfolders"),
    )
    yield svc
    svc.close()


def _fill(path: Path) -> int:
    """Write ``path`` until its file system is full, as a kernel can; the bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    written = 0
    try:
        while True:
            written += os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return written


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def test_a_file_that_appears_during_an_upload_without_overwrite_is_a_conflict(service):
    service.create(ADA, "data", quota=100_000)
    path = host(service, ADA, "data")

    def chunks():
        yield b"u" * 30_000
        (path / "new.txt").write_bytes(b"the kernel's")  # a kernel writes the same name
        yield b"u" * 30_000

    with pytest.raises(Conflict) as info:
        service.upload(ADA, "data", "new.txt", chunks(), overwrite=False)
    assert str(info.value) == "'new.txt' already exists in vfolder 'data': pass overwrite=True"
    # The kernel's file is kept whole and no partial upload is left next to it.
    assert os.listdir(path) == ["new.txt"]
    assert read(service, ADA, "data", "new.txt") == b"the kernel's"
    # The 60,000 bytes it reserved are given back: exactly what is left of the quota fits.
    assert service.usage(ADA, "data", fresh=True) == directory_usage(str(path)) == 12
    with pytest.raises(QuotaExceeded, match="uses 12B of its 97.7KiB quota"):
        upload(service, ADA, "data", "rest.bin", b"", size_hint=100_000 - 12 + 1)
    upload(service, ADA, "data", "rest.bin", b"r" * (100_000 - 12), overwrite=False)
    assert directory_usage(str(path)) == 100_000


def test_an_upload_that_fills_the_file_system_is_refused_and_leaves_nothing(
    tiny_service, tiny_disk
):
    service = tiny_service
    service.create(ADA, "data")
    path = host(service, ADA, "data")
    # Another tenant of the disk fills it, then leaves 40 KiB.
    filler = tiny_disk / "other-tenant.bin"
    _fill(filler)
    os.truncate(filler, os.stat(filler).st_size - 40 * 1024)
    free = _free(tiny_disk)
    assert 0 < free < 100_000
    with pytest.raises(QuotaExceeded) as info:
        upload(service, ADA, "data", "big.bin", b"b" * 200_000)
    # Shown: the bytes it had taken when the disk filled.
    # A directory vfolder's quota is not what filled: the server's disk is, and it says so.
    assert str(info.value) == (
        "uploading 'big.bin' failed: the server's disk under vfolder 'data' is full (this "
        "is not the vfolder's quota). Ask an admin to free space on the server."
    )
    # Nothing half-written: no partial file, and the disk has what it had.
    assert os.listdir(path) == []
    assert _free(tiny_disk) == free
    # Nothing still reserved: under a quota set now, exactly that quota fits.
    filler.unlink()
    assert service.update(ADA, "data", quota=200_000).quota == 200_000
    assert service.usage(ADA, "data", fresh=True) == 0
    with pytest.raises(QuotaExceeded, match="uses 0B of its 195.3KiB quota"):
        upload(service, ADA, "data", "big.bin", b"", size_hint=200_001)
    upload(service, ADA, "data", "big.bin", b"b" * 200_000)
    assert read(service, ADA, "data", "big.bin") == b"b" * 200_000
    assert service.usage(ADA, "data", fresh=True) == 200_000


def test_a_full_disk_under_a_directory_vfolder_with_a_quota_is_not_called_its_quota(
    tiny_service, tiny_disk
):
    service = tiny_service
    service.create(ADA, "data", quota=600_000)
    _fill(tiny_disk / "other-tenant.bin")
    with pytest.raises(QuotaExceeded) as info:
        upload(service, ADA, "data", "big.bin", b"b" * 200_000)
    assert "the server's disk under vfolder 'data' is full" in str(info.value)
    assert "quota:" not in str(info.value)
    assert os.listdir(host(service, ADA, "data")) == []


@needs_root
def test_mkdir_in_a_full_loopback_vfolder_is_refused_and_makes_nothing(service):
    service.create(ADA, "hard", quota="16MiB", backend="loopback")
    path = host(service, ADA, "hard")
    # A kernel fills it: a large file, then directories until not even one more fits.
    _fill(path / "fill.bin")
    kernel_dirs = 0
    while True:
        try:
            os.mkdir(path / f"k{kernel_dirs}")
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            break
        kernel_dirs += 1
    before = tree(path)
    full = "vfolder 'hard' is full (its quota is 16MiB): delete files or ask for a larger quota"
    for where, parents in (("results", False), ("a/b/c", True)):
        with pytest.raises(QuotaExceeded) as info:
            service.mkdir(ADA, "hard", where, parents=parents)
        assert str(info.value) == full
    assert tree(path) == before
    service.delete_file(ADA, "hard", "fill.bin")
    entry = service.mkdir(ADA, "hard", "a/b/c", parents=True)
    assert (entry.name, entry.type) == ("c", "dir")
    assert (path / "a" / "b" / "c").is_dir()


# -- quotas, clones and mounts at their limits ---------------------------------------------
def test_a_quota_cannot_shrink_below_what_the_vfolder_holds_now_but_can_shrink_to_it(service):
    service.create(ADA, "data", quota="1MiB")
    upload(service, ADA, "data", "a.bin", b"a" * 100_000)  # counted: 100,000 bytes
    path = host(service, ADA, "data")
    (path / "from-kernel.bin").write_bytes(b"k" * 400_000)  # not counted yet
    with pytest.raises(Conflict) as info:
        service.update(ADA, "data", quota=300_000)
    assert str(info.value) == (
        "vfolder 'data' of ada holds 488.3KiB, more than the new quota of 293KiB: delete "
        "files first, or ask for at least 488.3KiB"
    )
    assert service.get(ADA, "data")[0].quota == MiB
    with pytest.raises(Conflict, match="holds 488.3KiB"):
        service.update(ADA, "data", quota=500_000 - 1)
    assert service.update(ADA, "data", quota=500_000).quota == 500_000
    with pytest.raises(QuotaExceeded, match="uses 488.3KiB of its 488.3KiB quota"):
        upload(service, ADA, "data", "one.byte", b"1")
    assert sorted(os.listdir(path)) == ["a.bin", "from-kernel.bin"]


def assert_no_clone_left(service, dirs: list[str]) -> None:
    """bob's refused clone left nothing: no vfolder listed, no row in any status, and no
    storage directory besides those in ``dirs``."""
    assert [(v["name"], v["relation"]) for v in service.list(BOB)] == [
        ("own", "own"),
        ("src", "shared"),
    ]
    assert [(v.name, v.status) for v in service.store.user_vfolders("bob")] == [("own", "ready")]
    assert sorted(os.listdir(Path(service.root) / "dirs")) == dirs


def test_a_clone_whose_source_grows_past_the_owners_total_leaves_no_target(
    service, policies, monkeypatch
):
    policies["bob"] = Policy(max_vfolder_total_size=60_000)
    service.create(ADA, "src", cloneable=True)
    upload(service, ADA, "src", "a.bin", b"a" * 50_000)
    service.accept(BOB, service.invite(ADA, "src", "bob", "ro").id)
    service.create(BOB, "own")
    dirs = sorted(os.listdir(Path(service.root) / "dirs"))
    directory = service.backend("directory")
    create = directory.create

    def create_while_a_kernel_writes(vfolder):
        create(vfolder)
        if vfolder.name == "mine":  # the clone's target is made; the source grows
            (host(service, ADA, "src") / "late.bin").write_bytes(b"l" * 20_000)

    monkeypatch.setattr(directory, "create", create_while_a_kernel_writes)
    with pytest.raises(QuotaExceeded) as info:
        service.clone(BOB, "src", "mine")
    assert str(info.value) == (
        "vfolder 'src' of ada grew while it was copied and no longer fits (68.4KiB needed, "
        "58.6KiB allowed): delete files from it or ask for a larger quota, then clone again"
    )
    # No target: no row, no storage, nothing counted against bob.
    assert_no_clone_left(service, dirs)
    assert service.owner_usage("bob") == {"count": 1, "bytes": 0}
    monkeypatch.undo()
    service.delete_file(ADA, "src", "late.bin")
    clone = service.clone(BOB, "src", "mine")
    assert tree(host(service, BOB, "mine")) == tree(host(service, ADA, "src"))
    assert service.owner_usage("bob") == {"count": 2, "bytes": 50_000}
    assert clone.name == "mine"


def test_a_clone_refused_by_the_owners_total_leaves_no_target(service, policies):
    policies["bob"] = Policy(max_vfolder_total_size=60_000)
    service.create(ADA, "src", cloneable=True)
    upload(service, ADA, "src", "a.bin", b"a" * 50_000)
    service.accept(BOB, service.invite(ADA, "src", "bob", "ro").id)
    service.create(BOB, "own")
    upload(service, BOB, "own", "x.bin", b"x" * 20_000)
    dirs = sorted(os.listdir(Path(service.root) / "dirs"))
    with pytest.raises(QuotaExceeded) as info:
        service.clone(BOB, "src", "mine")
    assert str(info.value) == (
        "cloning vfolder 'src' of ada (48.8KiB) would pass your storage quota: you store "
        "19.5KiB of 58.6KiB (max_vfolder_total_size); purge or delete files first"
    )
    assert_no_clone_left(service, dirs)
    assert service.owner_usage("bob") == {"count": 1, "bytes": 20_000}
    service.delete_file(BOB, "own", "x.bin")
    service.clone(BOB, "src", "mine")
    assert service.owner_usage("bob") == {"count": 2, "bytes": 50_000}


def test_vfolders_of_an_owner_over_their_total_are_mounted_read_only_until_under_again(
    service, policies
):
    policies["ada"] = Policy(max_vfolder_total_size=50_000)
    service.create(ADA, "one")
    service.create(ADA, "two")
    service.create(ADMIN, "team", type="project", group="ml")
    service.accept(BOB, service.invite(ADA, "two", "bob", "rw").id)
    (host(service, ADA, "one") / "from-kernel.bin").write_bytes(b"k" * 60_000)
    over = (
        "ada stores 58.6KiB in all their vfolders, more than the 48.8KiB allowed; it is "
        "writable again once files are deleted"
    )
    mounts = service.resolve_mounts(ADA, ["one", "two", "team"])
    assert [(m.name, m.read_only, m.permission, m.reason) for m in mounts] == [
        ("one", True, Permission.WD, over),
        ("two", True, Permission.WD, over),
        ("team", False, Permission.RW, ""),  # a project vfolder is not the owner's
    ]
    # A recipient's mount counts against the owner too.
    (shared,) = service.resolve_mounts(BOB, ["two"])
    assert (shared.read_only, shared.permission, shared.reason) == (True, Permission.RW, over)
    # Asked read-only: read-only without a reason.
    (asked,) = service.resolve_mounts(ADA, ["two:ro"])
    assert (asked.read_only, asked.reason) == (True, "")
    service.delete_file(ADA, "one", "from-kernel.bin")
    mounts = service.resolve_mounts(ADA, ["one", "two"])
    assert [(m.read_only, m.reason) for m in mounts] == [(False, ""), (False, "")]


def test_a_failed_create_or_clone_leaves_no_lock_file_behind(service):
    locks = Path(service.root) / "locks"
    made = service.create(ADA, "data")
    with pytest.raises(Conflict):
        service.create(ADA, "data")  # the name is taken: refused at the insert
    assert sorted(p.name for p in locks.iterdir()) == [f"{made.id}.busy"]
    with pytest.raises(Conflict):
        service.clone(ADA, "data", "data")  # a clone onto a taken name
    assert sorted(p.name for p in locks.iterdir()) == [f"{made.id}.busy"]
