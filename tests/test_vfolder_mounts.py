"""vfolders mounted into container kernels: permissions, read-only shares, hard quotas."""

from __future__ import annotations

import errno
import json

import nbformat
import pytest
from traitlets.config import Config

from jupyter_gpu_sessions.core.errors import Conflict, GPUSessionsError
from jupyter_gpu_sessions.provisioner import current_owner

from .api_support import ADMIN, Api, server_fixtures
from .support import (
    labelled_containers,
    make_notebook_dir,
    run_code,
    shipped_spec,
    start_kernel,
    stop_kernel,
    write_kernelspec,
)


@pytest.fixture
def vfolder_manager(fresh_manager, tmp_path, monkeypatch):
    """A manager whose kernels belong to alice (as under JupyterHub), with bob known."""
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    manager = fresh_manager(
        config=Config({"VFolderService": {"root": str(tmp_path / "vfolders")}}),
        groups={"lab": ["alice", "bob"]},
    )
    yield manager
    service = manager.vfolders
    for who in (manager.identity("alice"), manager.identity("bob")):
        for item in service.list(who):
            if item["relation"] == "own":
                service.delete(who, item["id"])
        for item in service.list_trash(who):
            service.purge(who, item["id"])  # unmounts loopback images


def _spec(kernel_image: str, vfolders: list[str]) -> dict:
    spec = shipped_spec("python3-container")
    spec["metadata"]["kernel_provisioner"]["config"].update(
        image=kernel_image, cpus=1, memory="1GiB", vfolders=vfolders
    )
    return spec


MOUNT_CHECK = """
import errno, os
print(open('/home/work/data/hello.txt').read())
with open('/home/work/data/from-kernel.txt', 'w') as f:
    f.write('written in the kernel')
print(open('/home/work/team/readme.txt').read())
try:
    open('/home/work/team/nope.txt', 'w')
    print('team writable')
except OSError as exc:
    print('team', errno.errorcode[exc.errno])
os.symlink('/etc', '/home/work/data/escape')
print(sorted(os.listdir('/home/work')))
"""


async def test_vfolders_are_mounted_with_their_permission_and_ro_cannot_be_written(
    vfolder_manager, kernel_dir, notebook_dir, kernel_image
):
    manager = vfolder_manager
    service = manager.vfolders
    alice, bob = manager.identity("alice"), manager.identity("bob")
    service.create(alice, "data")
    service.upload(alice, "data", "hello.txt", [b"hello from the API"])
    service.create(bob, "team")
    service.upload(bob, "team", "readme.txt", [b"bob's notes"])
    share = service.invite(bob, "team", "alice", "rw")
    service.accept(alice, share.id)
    service.create(bob, "private")

    ksm = write_kernelspec(kernel_dir, "mounts", _spec(kernel_image, ["data", "team:ro"]))
    km, kc = await start_kernel("mounts", notebook_dir, kernel_spec_manager=ksm)
    try:
        _, out = await run_code(kc, MOUNT_CHECK)
        # In the trash while mounted is fine (restorable); purging it under the kernel is not.
        service.delete(alice, "data")
        with pytest.raises(Conflict, match="mounted in 1 running kernel"):
            service.purge(alice, "data")
        service.restore(alice, "data")
    finally:
        await stop_kernel(km, kc)
    lines = out.splitlines()
    assert lines[0] == "hello from the API"
    assert lines[1] == "bob's notes"
    assert lines[2] == "team EROFS"  # rw share asked for as ro: a read-only bind
    assert "data" in lines[3] and "team" in lines[3]

    # What the kernel wrote is in the vfolder; the symlink it planted is never followed.
    entries = {e.name: e.type for e in service.list_files(alice, "data")}
    assert entries["from-kernel.txt"] == "file" and entries["escape"] == "symlink"
    with pytest.raises(GPUSessionsError) as refused:
        service.open_download(alice, "data", "escape/passwd")
    assert 400 <= _status(refused.value) < 500

    # Unknown, and someone else's unshared vfolder: the start fails and says which.
    for wanted in (["nothing-here"], ["private"]):
        write_kernelspec(kernel_dir, "bad-mount", _spec(kernel_image, wanted))
        with pytest.raises(GPUSessionsError, match=wanted[0]) as failed:
            await start_kernel("bad-mount", notebook_dir, kernel_spec_manager=ksm)
        assert "bob" not in str(failed.value)
    # Asking for more than the share grants is refused, not silently lowered.
    share = service.set_permission(bob, "team", "alice", "ro")
    write_kernelspec(kernel_dir, "too-much", _spec(kernel_image, ["team:rw"]))
    with pytest.raises(GPUSessionsError, match="team"):
        await start_kernel("too-much", notebook_dir, kernel_spec_manager=ksm)
    assert manager.held_devices() == {}


LOOPBACK_FILL = """
import errno
written = 0
try:
    with open('/home/work/small/big.bin', 'wb') as f:
        chunk = b'x' * (1 << 20)
        for _ in range(64):
            f.write(chunk)
            f.flush()
            written += len(chunk)
        import os; os.fsync(f.fileno())
    print('no error', written)
except OSError as exc:
    print(errno.errorcode[exc.errno], written)
"""


async def test_a_loopback_vfolder_is_a_hard_quota_inside_the_kernel(
    vfolder_manager, kernel_dir, notebook_dir, kernel_image
):
    manager = vfolder_manager
    service = manager.vfolders
    alice = manager.identity("alice")
    service.create(alice, "small", quota="16MiB", backend="loopback")
    keep = bytes(range(256)) * 4096  # 1 MiB
    service.upload(alice, "small", "keep.bin", [keep])

    ksm = write_kernelspec(kernel_dir, "small", _spec(kernel_image, ["small"]))
    km, kc = await start_kernel("small", notebook_dir, kernel_spec_manager=ksm)
    try:
        _, out = await run_code(kc, LOOPBACK_FILL)
    finally:
        await stop_kernel(km, kc)
    code, written = out.split()
    assert code == errno.errorcode[errno.ENOSPC], out
    assert int(written) < 16 << 20
    f, size, _ = service.open_download(alice, "small", "keep.bin")
    with f:
        assert size == len(keep) and f.read() == keep


def _status(exc: GPUSessionsError) -> int:
    from jupyter_gpu_sessions.server.base import STATUS

    return next(code for klass, code in STATUS if isinstance(exc, klass))


jp_server_config, jp_auth_header = server_fixtures()


async def test_a_notebook_asks_for_its_vfolders_in_its_metadata(
    jp_fetch, jp_serverapp, jp_root_dir, jp_data_dir, kernel_image, docker_client
):
    """A notebook saved with {"jupyter-gpu-sessions": {"vfolders": [...]}} gets them mounted
    when jupyter_server's sessions API starts its kernel; an unknown one fails the start."""
    make_notebook_dir(jp_root_dir)
    target = jp_data_dir / "kernels" / "vf-container"
    target.mkdir(parents=True)
    (target / "kernel.json").write_text(json.dumps(_spec(kernel_image, [])))
    api = Api(jp_fetch)
    kernel_owner = current_owner()  # the server's user: the API acts as it for ADMIN here
    assert kernel_owner == ADMIN
    assert (await api.post("vfolders", user=ADMIN, body={"name": "results"}))[0] == 201
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["jupyter-gpu-sessions"] = {"vfolders": ["results:ro"]}
    nbformat.write(notebook, jp_root_dir / "analysis.ipynb")

    body = {"path": "analysis.ipynb", "type": "notebook", "kernel": {"name": "vf-container"}}
    response = await jp_fetch("api", "sessions", method="POST", body=json.dumps(body))
    session = json.loads(response.body)
    kernel_id = session["kernel"]["id"]
    try:
        km = jp_serverapp.kernel_manager.get_kernel(kernel_id)
        assert km.provisioner.session.name == "analysis.ipynb"  # named after its notebook
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            _, out = await run_code(
                kc,
                "import os\nprint(os.path.isdir('/home/work/results'), "
                "os.access('/home/work/results', os.W_OK))",
            )
        finally:
            kc.stop_channels()
        assert out.split() == ["True", "False"]  # mounted, and read-only as the notebook asked
    finally:
        await jp_fetch("api", "sessions", session["id"], method="DELETE")

    manager = jp_serverapp.web_app.settings["gpu_sessions_engine"].manager
    before = len(manager.store.list())
    notebook.metadata["jupyter-gpu-sessions"] = {"vfolders": ["no-such-folder"]}
    nbformat.write(notebook, jp_root_dir / "other.ipynb")
    body["path"] = "other.ipynb"
    response = await jp_fetch(
        "api", "sessions", method="POST", body=json.dumps(body), raise_error=False
    )
    assert response.code >= 400
    assert "no-such-folder" in response.body.decode()
    # Refused before it queued: no session, no container.
    assert len(manager.store.list()) == before
    assert labelled_containers(docker_client, **{"store": manager.store_id}) == []
