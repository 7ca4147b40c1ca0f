"""Launch parameters: every kernelspec's JEP 87 schema, the launcher's live view, and the
notebook's saved choice applied at every start and restart.

The shapes the JupyterLab dialog reads and writes:

``GET {base_url}gpu-sessions/api/launcher`` answers::

    {"user": "alice",
     "host": {"gpus": 4, "whole_gpus": 4, "gpu_models": ["Simulated A100-80GB"],
              "mig_profiles": [], "cpus": 2, "memory": 25275990016},
     "free": {"gpus": 0, "gpus_total": 4,
              "mig": {},  # per MIG profile: {"1g.10gb": {"free": 7, "total": 7}}
              "share_room": 0.0, "summary": "0 of 4 GPUs free"},
     "queue": {"pending": 0},
     "policy": {"limits": {"max_gpus": 2.0, ...every Policy limit, null: none},
                "sources": {"max_gpus": "user:alice"},
                "usage": {"sessions": 0, "pending_sessions": 0, "gpus": 0.0, "cpus": 0.0,
                          "memory": 0}},
     "images": ["jupyter-gpu-sessions/python3:…"],
     "vfolders": [{"name": "data", "permission": "rw", "mount_permissions": ["ro", "rw"]}],
     "kernelspecs": [
       {"name": "python3-gpu", "display_name": "Python 3 (1 GPU)", "runtime": "docker",
        "defaults": <a saved choice, below: the kernelspec's own values>,
        "parameters": <JSON Schema draft-07, as in the kernelspec's metadata.parameters but
                       bounded by this host and the caller's policy>,
        "status": {"status": "would-queue", "position": 1, "queued_ahead": 0,
                   "waits_for": "GPUs to be freed: 0 of 4 GPUs free"},
        "choices": {
          "gpus": [{"value": 0, "status": "allowed"},
                   {"value": 2, "status": "would-queue", "position": 1, ...},
                   {"value": 3, "status": "forbidden",
                    "limit": "max_gpus 2 (policy user:alice)"}],
          "gpu_profile": [{"value": "1g.10gb", "status": ...}],
          "gpu_share": [{"value": 0.25, "status": ...}, 0.5, 0.75],
          "cpus": {"maximum": 2.0, "limit": "this host has 2 CPUs"},
          "memory": {"maximum": 25275990016, "limit": "max_memory 8GiB (policy default)"},
          "image": [{"value": "jupyter-gpu-sessions/python3:…", "status": "allowed"}]}}]}

A kernelspec whose own settings do not validate has ``"error"`` instead of parameters,
status and choices.

The notebook's saved choice, ``metadata["jupyter-gpu-sessions"]`` (every key optional)::

    {"resources": {"gpus": 2, "gpu_profile": "", "gpu_share": 0, "cpus": 2, "memory": "8GiB"},
     "image": "jupyter-gpu-sessions/python3:…",
     "vfolders": [{"name": "data", "permission": "ro"}]}

One GPU form only: a choice naming any of gpus/gpu_profile/gpu_share replaces all three of
the kernelspec's. The schema's properties are flat (gpus, gpu_profile, gpu_share, cpus,
memory, image, vfolders): ``resources.*`` are the first five.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import nbformat
import pytest

from jupyter_gpu_sessions.core.errors import InvalidRequest
from jupyter_gpu_sessions.core.parameters import (
    apply_choice,
    defaults_from_config,
    parameters_schema,
    parse_choice,
    static_bounds,
)
from jupyter_gpu_sessions.core.policy import PolicySet
from jupyter_gpu_sessions.engine import current_owner
from jupyter_gpu_sessions.kernelspecs import kernel_json, static_parameters
from jupyter_gpu_sessions.manager.launcher import launcher_json

from .api_support import ADMIN, Api, server_fixtures, stored_session
from .support import make_notebook_dir, run_code, shipped_spec, wait_for_iopub


def _flat(choice: dict) -> dict:
    """A saved choice as an instance of the (flat) parameters schema."""
    return {**choice["resources"], "image": choice["image"], "vfolders": choice["vfolders"]}


# -- the schema in every kernelspec ----------------------------------------------------------
@pytest.mark.parametrize("name", ["python3-container", "python3-gpu"])
def test_every_shipped_kernelspec_carries_its_resources_as_a_jep87_schema(name):
    spec = shipped_spec(name)
    config = spec["metadata"]["kernel_provisioner"]["config"]
    schema = spec["metadata"]["parameters"]
    assert schema == static_parameters(config)  # the file is what the code writes
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    props = schema["properties"]
    assert set(props) == {"gpus", "gpu_profile", "gpu_share", "cpus", "memory", "image", "vfolders"}
    assert props["gpus"]["default"] == config["gpus"]
    assert props["memory"]["default"] == config["memory"]
    assert props["cpus"]["default"] == config["cpus"]
    # Static files cannot know the host: the engine's own limits, and where the live ones are.
    assert props["gpus"]["maximum"] == 64
    assert "gpu-sessions/api/launcher" in schema["$comment"]
    validator = jsonschema.Draft7Validator(schema)
    validator.validate(_flat(defaults_from_config(config)))
    assert not validator.is_valid({"gpus": 65})
    assert not validator.is_valid({"memory": "lots"})
    assert not validator.is_valid({"vfolders": [{"name": "data", "permission": "wd"}]})
    assert not validator.is_valid({"gpu_share": 1.5})
    assert not validator.is_valid({"gpu_profile": "big"})


def test_kernelspecs_written_by_the_cli_carry_the_schema_with_their_values(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jupyter_gpu_sessions.cli", "kernelspec", "install"]
        + ["--name", "two", "--gpus", "2", "--cpus", "4", "--memory", "16GiB"]
        + ["--image", "my/img:1", "--prefix", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    spec = json.loads((tmp_path / "share/jupyter/kernels/two/kernel.json").read_text())
    assert spec == kernel_json(
        display_name=spec["display_name"], gpus=2, cpus=4, memory="16GiB", image="my/img:1"
    )
    schema = spec["metadata"]["parameters"]
    jsonschema.Draft7Validator.check_schema(schema)
    props = schema["properties"]
    assert props["gpus"]["default"] == 2 and props["cpus"]["default"] == 4.0
    assert props["image"] == {**props["image"], "enum": ["my/img:1"], "default": "my/img:1"}


def test_the_live_schema_is_bounded_by_the_host_and_its_mig_profiles(fresh_manager):
    manager = fresh_manager(
        simulated_gpus="2xA100-80GB,1xA100-80GB:mig=1g.10gb*3+2g.20gb*2",
        allowed_images=["team/torch:2", "team/jax:1"],
    )
    who = manager.identity("alice")
    config = shipped_spec("python3-gpu")["metadata"]["kernel_provisioner"]["config"]
    view = launcher_json(manager, who, [{"name": "g", "display_name": "G", "config": config}])
    (entry,) = view["kernelspecs"]
    schema = entry["parameters"]
    jsonschema.Draft7Validator.check_schema(schema)
    props = schema["properties"]
    assert props["gpus"]["maximum"] == 2  # the GPUs not in MIG mode
    assert props["gpu_profile"]["enum"] == ["", "1g.10gb", "2g.20gb"]
    assert props["cpus"]["maximum"] == os.cpu_count()
    assert props["memory"]["x-maximum-bytes"] == view["host"]["memory"]
    assert props["image"]["enum"] == [manager.default_image, "team/torch:2", "team/jax:1"]
    assert view["free"]["mig"] == {
        "1g.10gb": {"free": 3, "total": 3},
        "2g.20gb": {"free": 2, "total": 2},
    }
    assert view["free"]["gpus"] == 2 and view["free"]["share_room"] == 1.0
    assert [c["value"] for c in entry["choices"]["gpus"]] == [0, 1, 2]
    assert all(c["status"] == "allowed" for c in entry["choices"]["gpu_profile"])
    jsonschema.validate(_flat(entry["defaults"]), schema)

    # A kernelspec whose own settings do not validate says so, instead of a schema.
    bad = {"name": "b", "display_name": "B", "config": {"memory": "8XB"}}
    (entry,) = launcher_json(manager, who, [bad])["kernelspecs"]
    assert "unknown unit" in entry["error"] and "parameters" not in entry
    bad["config"] = {"gpus": "many"}
    (entry,) = launcher_json(manager, who, [bad])["kernelspecs"]
    assert "invalid setting" in entry["error"]

    # A host without GPUs offers none, whatever the kernelspec file says.
    manager = fresh_manager()
    view = launcher_json(manager, who, [{"name": "g", "display_name": "G", "config": config}])
    (entry,) = view["kernelspecs"]
    props = entry["parameters"]["properties"]
    assert props["gpus"]["maximum"] == 0 and props["gpu_share"]["maximum"] == 0
    assert entry["status"]["status"] == "forbidden"
    assert "no GPUs" in entry["status"]["limit"]


def test_a_saved_choice_is_read_in_both_vfolder_forms_and_replaces_the_gpu_form():
    choice = parse_choice(
        {
            "resources": {"gpus": 2, "memory": "2GiB"},
            "image": "team/torch:2",
            "vfolders": ["data", "scratch:rw", {"name": "team-ds", "permission": "ro"}],
        }
    )
    assert choice.vfolders == ["data", "scratch:rw", "team-ds:ro"]
    merged = apply_choice({"gpus": 0, "gpu_share": 0.5, "cpus": 1, "memory": "8GiB"}, choice)
    assert merged == {
        "gpus": 2,
        "gpu_profile": "",
        "gpu_share": 0.0,
        "cpus": 1,
        "memory": "2GiB",
    }
    for bad, words in [
        ([1], "must be an object"),
        ({"resources": {"gpus": "two"}}, "resources.gpus must be a whole number"),
        ({"resources": {"gpus": True}}, "resources.gpus"),
        ({"resources": {"vram": 3}}, "resources.vram is not a resource"),
        ({"resources": {"cpus": "many"}}, "resources.cpus must be a number"),
        ({"image": 3}, "image must be an image name"),
        ({"vfolders": {"data": "ro"}}, "vfolders must be a list"),
        ({"vfolders": [{"name": "data", "permission": "all"}]}, "not ro or rw"),
        ({"colour": "red"}, "colour is not a known key"),
    ]:
        with pytest.raises(InvalidRequest, match=words):
            parse_choice(bad, where="nb.ipynb")


def test_a_limit_is_named_with_the_policy_scope_that_sets_it():
    policies = PolicySet.from_config(
        {"default": {"max_gpus": 1, "max_cpus": 2}, "group:ml": {"max_gpus": 3}}
    )
    assert policies.source_of("max_gpus", "ada", ["ml"]) == "group:ml"
    assert policies.source_of("max_cpus", "ada", ["ml"]) == "default"
    policies = PolicySet.from_config({"group:ml": {"max_gpus": 3}, "user:ada": {"max_gpus": 2}})
    assert policies.source_of("max_gpus", "ada", ["ml"]) == "user:ada"


def test_static_bounds_name_only_the_kernelspecs_own_image():
    schema = parameters_schema(defaults_from_config({"image": "a/b:1"}), static_bounds("a/b:1"))
    assert schema["properties"]["image"]["enum"] == ["a/b:1"]
    schema = parameters_schema(defaults_from_config({}), static_bounds())
    assert schema["properties"]["image"]["enum"] == [""]  # the server's default image


# -- the launcher endpoint -------------------------------------------------------------------
jp_server_config, jp_auth_header = server_fixtures(
    GPUSessionManager={
        "policies": {"user:alice": {"max_gpus": 2}, f"user:{ADMIN}": {"max_gpus": 3}},
        "allowed_images": ["team/torch:2"],
    },
)


@pytest.fixture
def session_kernelspecs(jp_data_dir):
    """The shipped python3-gpu spec, and a local-runtime one with no GPUs of its own."""
    gpu = shipped_spec("python3-gpu")
    local = shipped_spec("python3-container")
    local["display_name"] = "Python 3 (local)"
    local["metadata"]["kernel_provisioner"]["config"] = {"gpus": 0, "runtime": "local"}
    for name, spec in (("python3-gpu", gpu), ("local-choice", local)):
        target = jp_data_dir / "kernels" / name
        target.mkdir(parents=True)
        (target / "kernel.json").write_text(json.dumps(spec))
    return ["local-choice", "python3-gpu"]


async def test_the_launcher_says_forbidden_by_policy_apart_from_would_queue_while_busy(
    jp_fetch, jp_serverapp, session_kernelspecs
):
    api = Api(jp_fetch)
    manager = jp_serverapp.web_app.settings["gpu_sessions_engine"].manager
    # carol holds all four GPUs: busy, for everyone.
    stored_session(manager, "carol", gpus=4)
    manager.schedule_pass()
    assert len(manager.held_devices()) == 4
    assert (await api.post("vfolders", user="alice", body={"name": "data"}))[0] == 201

    status, alice = await api.get("launcher", user="alice")
    assert status == 200, alice
    assert [k["name"] for k in alice["kernelspecs"]] == session_kernelspecs  # ours only
    assert alice["free"]["gpus"] == 0 and alice["free"]["gpus_total"] == 4
    assert alice["policy"]["sources"] == {"max_gpus": "user:alice"}
    gpu = next(k for k in alice["kernelspecs"] if k["name"] == "python3-gpu")
    jsonschema.Draft7Validator.check_schema(gpu["parameters"])
    assert gpu["parameters"]["properties"]["gpus"]["maximum"] == 2  # bounded by her policy
    by_value = {c["value"]: c for c in gpu["choices"]["gpus"]}
    assert by_value[0]["status"] == "allowed"
    assert by_value[2]["status"] == "would-queue"  # busy is not forbidden
    assert by_value[2]["position"] == 1 and "0 of 4 GPUs free" in by_value[2]["waits_for"]
    # Her vfolders, with the permissions she may mount them with (container kernels only).
    assert alice["vfolders"] == [
        {"name": "data", "permission": "wd", "mount_permissions": ["ro", "rw"]}
    ]
    names = gpu["parameters"]["properties"]["vfolders"]["items"]["properties"]["name"]
    assert names["enum"] == ["data"]
    local = next(k for k in alice["kernelspecs"] if k["name"] == "local-choice")
    assert local["parameters"]["properties"]["vfolders"]["maxItems"] == 0
    assert by_value[3] == {
        "value": 3,
        "status": "forbidden",
        "limit": "max_gpus 2 (policy user:alice)",
    }
    assert gpu["status"]["status"] == "would-queue"  # the card: its 1 GPU would queue

    status, bob = await api.get("launcher", user="bob")
    assert status == 200
    gpu = next(k for k in bob["kernelspecs"] if k["name"] == "python3-gpu")
    assert gpu["parameters"]["properties"]["gpus"]["maximum"] == 4
    assert {c["value"]: c["status"] for c in gpu["choices"]["gpus"]} == {
        0: "allowed",
        1: "would-queue",
        2: "would-queue",
        3: "would-queue",
        4: "would-queue",
    }
    assert bob["policy"]["sources"] == {}
    # The image allowlist, with the kernelspec's own image first.
    assert gpu["parameters"]["properties"]["image"]["enum"] == [
        manager.default_image,
        "team/torch:2",
    ]
    assert (await api.get("launcher", user=None))[0] == 401


# -- the notebook's choice at start and restart ----------------------------------------------
def _notebook(root, name: str, choice) -> str:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["jupyter-gpu-sessions"] = choice
    nbformat.write(notebook, root / name)
    return name


async def _start(jp_fetch, path: str, kernel: str, raise_error: bool = True):
    body = {"path": path, "type": "notebook", "kernel": {"name": kernel}}
    return await jp_fetch(
        "api", "sessions", method="POST", body=json.dumps(body), raise_error=raise_error
    )


async def _cuda_devices(kc) -> list[str]:
    _, out = await run_code(kc, "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'))")
    return out.strip().split(",")


async def test_a_notebook_that_asks_for_two_gpus_gets_them_at_every_start_and_restart(
    jp_fetch, jp_serverapp, jp_root_dir, session_kernelspecs
):
    make_notebook_dir(jp_root_dir)
    manager = jp_serverapp.web_app.settings["gpu_sessions_engine"].manager
    kernels = jp_serverapp.kernel_manager
    path = _notebook(jp_root_dir, "two.ipynb", {"resources": {"gpus": 2}})
    response = await _start(jp_fetch, path, "local-choice")
    session = json.loads(response.body)
    kernel_id = session["kernel"]["id"]
    try:
        km = kernels.get_kernel(kernel_id)
        await km.ready
        first = km.provisioner.session
        assert first.request.gpus == 2 and len(first.allocations) == 2
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            uuids = {a.device_uuid for a in first.allocations}
            assert set(await _cuda_devices(kc)) == uuids

            # A restart keeps the choice (and the session, with its GPUs).
            await jp_fetch("api", "kernels", kernel_id, "restart", method="POST", body="{}")
            await wait_for_iopub(kc)
            assert km.provisioner.session.id == first.id
            assert set(await _cuda_devices(kc)) == uuids

            # The choice changed meanwhile (the dialog's "change resources"): the next
            # restart applies it, on a new session, and gives the other GPU back.
            _notebook(jp_root_dir, path, {"resources": {"gpus": 1}})
            await jp_fetch("api", "kernels", kernel_id, "restart", method="POST", body="{}")
            await wait_for_iopub(kc)
            second = km.provisioner.session
            assert second.id != first.id and second.request.gpus == 1
            assert len(await _cuda_devices(kc)) == 1
            assert manager.store.get(first.id).reason == "restarted with a new resource choice"
            assert len(manager.held_devices()) == 1
        finally:
            kc.stop_channels()
    finally:
        await jp_fetch("api", "sessions", session["id"], method="DELETE")
    assert manager.held_devices() == {}


@pytest.mark.parametrize(
    ("choice", "code", "words"),
    [
        # the owner's policy (user:root max_gpus 3)
        ({"resources": {"gpus": 4}}, 403, "max_gpus = 3"),
        # more than the host has
        ({"resources": {"gpus": 5}}, 422, "this host has 4"),
        # the schema's range
        ({"resources": {"gpu_share": 1.5}}, 400, "gpu_share 1.5 is out of range"),
        ({"resources": {"gpus": 1, "gpu_share": 0.5}}, 400, "one form only"),
        ({"resources": {"memory": "8 bananas"}}, 400, "unknown unit"),
        # the image allowlist
        ({"image": "evil/miner:latest"}, 403, "allowlist"),
        # malformed: wrong types
        ({"resources": {"gpus": "two"}}, 400, "resources.gpus must be a whole number"),
        ({"resources": [2]}, 400, "resources must be an object"),
        ("two GPUs please", 400, "must be an object"),
        ({"vfolders": [{"name": "data", "permission": "delete"}]}, 400, "not ro or rw"),
    ],
)
async def test_a_start_whose_choice_breaks_the_schema_policy_or_allowlist_is_refused_4xx(
    jp_fetch, jp_serverapp, jp_root_dir, session_kernelspecs, choice, code, words
):
    assert current_owner() == ADMIN  # the server's user owns its kernels: user:root applies
    make_notebook_dir(jp_root_dir)
    manager = jp_serverapp.web_app.settings["gpu_sessions_engine"].manager
    path = _notebook(jp_root_dir, "bad.ipynb", choice)
    response = await _start(jp_fetch, path, "local-choice", raise_error=False)
    body = response.body.decode()
    assert response.code == code, body
    assert words in json.loads(body)["message"], body
    assert "bad.ipynb" in body or code in (403, 422)
    assert manager.store.list() == []  # refused before it queued
    assert jp_serverapp.kernel_manager.list_kernel_ids() == []
