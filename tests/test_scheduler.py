"""The pure scheduler: device placement (whole GPUs, MIG instances, shares), the FIFO and
DRF passes, policy limits, dependencies, and property tests of the allocator's invariants."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jupyter_gpu_sessions.core.models import Allocation, GPUDevice, MigInstance, ResourceRequest
from jupyter_gpu_sessions.core.policy import Policy
from jupyter_gpu_sessions.core.status import SessionStatus
from jupyter_gpu_sessions.scheduler import (
    Capacity,
    CheckFailure,
    HostTotals,
    OwnerUsage,
    PendingSession,
    schedule,
)

GiB = 1024**3
S = SessionStatus


def plain(index: int) -> GPUDevice:
    return GPUDevice(index, f"GPU-{index}", "A100-80GB", 80 * GiB, index)


def mig(index: int, *profiles: str) -> GPUDevice:
    instances = tuple(
        MigInstance(f"MIG-{index}-{n}", profile, 10 * GiB, n) for n, profile in enumerate(profiles)
    )
    return GPUDevice(index, f"GPU-{index}", "A100-80GB", 80 * GiB, index, mig_instances=instances)


def hold(capacity: Capacity, request: ResourceRequest, session_id: str) -> list[Allocation]:
    allocations = capacity.place(request, session_id)
    assert allocations is not None, f"{request} did not fit: {capacity.free_summary(request)}"
    capacity.take(allocations)
    return allocations


def devices_of(allocations: list[Allocation]) -> list[str]:
    return [a.device_uuid for a in allocations]


GPUS = ResourceRequest(gpus=1)


def share(fraction: float) -> ResourceRequest:
    return ResourceRequest(gpu_share=fraction)


def profile(name: str) -> ResourceRequest:
    return ResourceRequest(gpu_profile=name)


# -- placement ---------------------------------------------------------------------------


def test_whole_gpus_prefer_contiguous_low_indices_and_are_never_held_twice():
    capacity = Capacity([plain(i) for i in range(4)])
    assert devices_of(hold(capacity, ResourceRequest(gpus=2), "a")) == ["GPU-0", "GPU-1"]
    assert devices_of(hold(capacity, ResourceRequest(gpus=2), "b")) == ["GPU-2", "GPU-3"]
    assert capacity.place(GPUS, "c") is None
    assert capacity.free_summary(GPUS) == "0 of 4 GPUs free"
    assert capacity.holders() == {f"GPU-{i}": ["a" if i < 2 else "b"] for i in range(4)}

    released = capacity.release("a")
    assert devices_of(released) == ["GPU-0", "GPU-1"]
    assert capacity.release("a") == []
    assert capacity.free_summary(GPUS) == "2 of 4 GPUs free"


def test_whole_gpus_break_the_fewest_runs():
    capacity = Capacity([plain(i) for i in range(4)])
    capacity.take([Allocation("x", "GPU-1", "GPU-1", "gpu", 1.0)])
    # Free: 0 | 2 3. One GPU goes to the lone GPU 0, keeping the pair for a 2-GPU request.
    assert devices_of(capacity.place(GPUS, "a")) == ["GPU-0"]
    assert devices_of(capacity.place(ResourceRequest(gpus=2), "b")) == ["GPU-2", "GPU-3"]
    # No run of three: the three lowest free GPUs.
    assert devices_of(capacity.place(ResourceRequest(gpus=3), "c")) == ["GPU-0", "GPU-2", "GPU-3"]
    assert capacity.place(ResourceRequest(gpus=4), "d") is None


def test_a_whole_gpu_request_skips_a_gpu_carrying_shares():
    capacity = Capacity([plain(0), plain(1)])
    capacity.take([Allocation("s", "GPU-0", "GPU-0", "share", 0.25)])
    assert devices_of(capacity.place(GPUS, "a")) == ["GPU-1"]
    assert capacity.place(ResourceRequest(gpus=2), "a") is None
    assert capacity.free_summary(GPUS) == "1 of 2 GPUs free (1 shared)"


def test_shares_pack_onto_one_gpu_and_a_fifth_quarter_goes_to_another():
    capacity = Capacity([plain(i) for i in range(4)])
    placed = [hold(capacity, share(0.25), f"s{n}")[0] for n in range(5)]
    assert {a.kind for a in placed} == {"share"}
    assert len({a.gpu_uuid for a in placed[:4]}) == 1
    assert placed[4].gpu_uuid != placed[0].gpu_uuid
    # Shares break the end of the shortest run, so whole GPUs keep the low, contiguous ones.
    assert devices_of(capacity.place(ResourceRequest(gpus=2), "w")) == ["GPU-0", "GPU-1"]
    assert capacity.holders()[placed[0].gpu_uuid] == ["s0", "s1", "s2", "s3"]


def test_shares_go_to_the_most_used_gpu_that_still_has_room():
    capacity = Capacity([plain(0), plain(1), plain(2)])
    capacity.take(
        [
            Allocation("a", "GPU-0", "GPU-0", "share", 0.5),
            Allocation("b", "GPU-1", "GPU-1", "share", 0.75),
        ]
    )
    assert capacity.place(share(0.25), "c")[0].gpu_uuid == "GPU-1"
    assert capacity.place(share(0.5), "c")[0].gpu_uuid == "GPU-0"
    assert capacity.place(share(0.6), "c")[0].gpu_uuid == "GPU-2"  # only an untouched one
    capacity.take([Allocation("w", "GPU-2", "GPU-2", "gpu", 1.0)])
    assert capacity.place(share(0.6), "c") is None
    assert capacity.free_summary(share(0.6)) == "0.5 of a GPU free at most"


def test_shares_are_summed_without_float_drift():
    capacity = Capacity([plain(0), plain(1)])
    for n, fraction in enumerate((0.1, 0.2, 0.7)):
        assert hold(capacity, share(fraction), f"a{n}")[0].gpu_uuid == "GPU-1"
    for n in range(3):
        assert hold(capacity, share(1 / 3), f"b{n}")[0].gpu_uuid == "GPU-0"
    assert capacity.place(share(0.01), "c") is None
    assert capacity.free_summary(share(0.01)) == "no GPU has room for a share"
    with pytest.raises(ValueError, match="does not fit"):
        capacity.take([Allocation("c", "GPU-1", "GPU-1", "share", 0.01)])


def test_a_mig_request_lands_on_an_instance_of_its_profile_packing_busy_gpus():
    capacity = Capacity(
        [plain(0), mig(1, *["1g.10gb"] * 7), mig(2, "3g.40gb", "3g.40gb", "1g.10gb")]
    )
    first = hold(capacity, profile("1g.10gb"), "a")
    assert first == [Allocation("a", "GPU-1", "MIG-1-0", "mig", 1 / 7)]
    big = hold(capacity, profile("3g.40gb"), "b")
    assert big == [Allocation("b", "GPU-2", "MIG-2-0", "mig", 3 / 7)]
    # GPU 2 is now the busier one: the next 1g.10gb goes there, then back to GPU 1.
    assert devices_of(hold(capacity, profile("1g.10gb"), "c")) == ["MIG-2-2"]
    assert devices_of(hold(capacity, profile("1g.10gb"), "d")) == ["MIG-1-1"]
    assert devices_of(hold(capacity, profile("3g.40gb"), "e")) == ["MIG-2-1"]
    assert capacity.place(profile("3g.40gb"), "f") is None
    assert capacity.free_summary(profile("3g.40gb")) == "no free 3g.40gb instance (2 in use)"
    assert capacity.free_summary(profile("1g.10gb")) == "5 of 8 1g.10gb instances free"
    # MIG GPUs are never handed out whole or in shares.
    assert devices_of(capacity.place(ResourceRequest(gpus=1), "g")) == ["GPU-0"]
    assert capacity.place(ResourceRequest(gpus=2), "g") is None
    assert capacity.place(share(0.5), "g")[0].gpu_uuid == "GPU-0"
    capacity.release("b")
    assert devices_of(capacity.place(profile("3g.40gb"), "f")) == ["MIG-2-0"]


def test_a_request_without_gpus_places_on_nothing():
    capacity = Capacity([])
    assert capacity.place(ResourceRequest(cpus=2), "a") == []
    assert capacity.unsatisfiable(ResourceRequest(cpus=2)) is None
    assert capacity.free_summary() == "no GPUs"


@pytest.mark.parametrize(
    ("devices", "request_", "message"),
    [
        (
            [plain(i) for i in range(4)],
            ResourceRequest(gpus=5),
            "asks for 5 GPUs, but this host has 4",
        ),
        ([], GPUS, "asks for 1 GPU, but this host has no GPUs"),
        ([], share(0.5), "asks for 0.5 of a GPU, but this host has no GPUs"),
        (
            [plain(0), mig(1, "1g.10gb")],
            ResourceRequest(gpus=2),
            "asks for 2 GPUs, but this host has 1 not in MIG mode (and 1 in MIG mode, "
            "offering 1g.10gb)",
        ),
        (
            [mig(0, "1g.10gb", "3g.40gb")],
            profile("2g.20gb"),
            "asks for a 2g.20gb MIG instance, but no GPU of this host offers that profile "
            "(offered: 1g.10gb, 3g.40gb)",
        ),
        (
            [plain(0)],
            profile("1g.10gb"),
            "asks for a 1g.10gb MIG instance, but no GPU of this host is in MIG mode: ask for "
            "whole `gpus` or a `gpu_share` instead",
        ),
        (
            [mig(0, "1g.10gb"), mig(1, "1g.10gb")],
            share(0.25),
            "asks for 0.25 of a GPU, but all 2 GPUs of this host are in MIG mode: ask for a "
            "gpu_profile (1g.10gb) instead",
        ),
        (
            [mig(0, "1g.10gb")],
            GPUS,
            "asks for 1 GPU, but the only GPU of this host is in MIG mode: ask for a "
            "gpu_profile (1g.10gb) instead",
        ),
    ],
)
def test_unsatisfiable_names_the_limit(devices, request_, message):
    assert Capacity(devices).unsatisfiable(request_) == message


@pytest.mark.parametrize(
    "request_", [ResourceRequest(gpus=4), profile("1g.10gb"), share(0.5), ResourceRequest()]
)
def test_what_fits_an_empty_host_is_satisfiable_even_when_busy(request_):
    devices = [plain(0), plain(1), plain(2), plain(3), mig(4, "1g.10gb")]
    capacity = Capacity(devices, [Allocation("x", "GPU-0", "GPU-0", "gpu", 1.0)])
    assert capacity.unsatisfiable(request_) is None


def test_free_summary_of_everything():
    capacity = Capacity([plain(0), plain(1), mig(2, "1g.10gb", "1g.10gb", "3g.40gb")])
    capacity.take([Allocation("a", "GPU-0", "GPU-0", "share", 0.5)])
    capacity.take([Allocation("b", "GPU-2", "MIG-2-1", "mig", 1 / 7)])
    assert capacity.free_summary() == (
        "1 of 2 GPUs not in MIG mode free (1 shared); at most 0.5 of a shared GPU free; "
        "1 of 2 1g.10gb instances free; 1 of 1 3g.40gb instances free"
    )


@pytest.mark.parametrize(
    "conflict",
    [
        Allocation("x", "GPU-0", "GPU-0", "gpu", 1.0),  # held whole by a
        Allocation("x", "GPU-0", "GPU-0", "share", 0.1),  # held whole by a
        Allocation("x", "GPU-1", "GPU-1", "gpu", 1.0),  # carries b's share
        Allocation("x", "GPU-1", "GPU-1", "share", 0.6),  # only 0.5 left
        Allocation("x", "GPU-2", "MIG-2-0", "mig", 1 / 7),  # held by c
        Allocation("x", "GPU-2", "GPU-2", "gpu", 1.0),  # in MIG mode
        Allocation("x", "GPU-2", "GPU-2", "share", 0.1),  # in MIG mode
        Allocation("x", "GPU-1", "MIG-2-1", "mig", 1 / 7),  # wrong parent GPU
        Allocation("x", "GPU-9", "GPU-9", "gpu", 1.0),  # no such GPU
        Allocation("x", "GPU-3", "GPU-3", "share", 0.0),  # an empty share
        Allocation("x", "GPU-3", "GPU-3", "slice", 1.0),  # no such kind
    ],
)
def test_take_refuses_any_conflict_and_takes_nothing(conflict):
    devices = [plain(0), plain(1), mig(2, "1g.10gb", "1g.10gb"), plain(3)]
    capacity = Capacity(
        devices,
        [
            Allocation("a", "GPU-0", "GPU-0", "gpu", 1.0),
            Allocation("b", "GPU-1", "GPU-1", "share", 0.5),
            Allocation("c", "GPU-2", "MIG-2-0", "mig", 1 / 7),
        ],
    )
    before = (capacity.allocations(), capacity.holders(), capacity.free_summary())
    fine = Allocation("x", "GPU-3", "GPU-3", "gpu", 1.0)
    with pytest.raises(ValueError):
        capacity.take([fine, conflict])
    assert (capacity.allocations(), capacity.holders(), capacity.free_summary()) == before
    assert capacity.place(GPUS, "y") == [Allocation("y", "GPU-3", "GPU-3", "gpu", 1.0)]


def test_conflicts_within_one_batch_and_in_the_initial_allocations_are_refused():
    capacity = Capacity([plain(0)])
    with pytest.raises(ValueError, match="held by"):
        capacity.take(
            [
                Allocation("a", "GPU-0", "GPU-0", "gpu", 1.0),
                Allocation("b", "GPU-0", "GPU-0", "gpu", 1.0),
            ]
        )
    with pytest.raises(ValueError, match="carries shares"):
        capacity.take(
            [
                Allocation("a", "GPU-0", "GPU-0", "share", 0.5),
                Allocation("b", "GPU-0", "GPU-0", "gpu", 1.0),
            ]
        )
    assert capacity.allocations() == []
    with pytest.raises(ValueError):
        Capacity(
            [plain(0)],
            [
                Allocation("a", "GPU-0", "GPU-0", "share", 0.75),
                Allocation("b", "GPU-0", "GPU-0", "share", 0.5),
            ],
        )
    with pytest.raises(ValueError, match="listed twice"):
        Capacity([plain(0), plain(0)])


# -- the scheduling pass -------------------------------------------------------------------

TOTALS = HostTotals(gpus=4.0, cpus=64.0, memory=256 * GiB)


def pend(session_id, owner="ada", at=0.0, attempts=0, depends_on=(), **request) -> PendingSession:
    return PendingSession(
        session_id,
        owner,
        ResourceRequest(**request),
        created_at=at,
        attempts=attempts,
        depends_on=tuple(depends_on),
    )


def run(pending, capacity, *, usage=None, policies=None, dependencies=None, **options):
    policies = policies or {}
    options.setdefault("totals", TOTALS)
    return schedule(
        pending,
        capacity,
        usage or {},
        lambda owner: policies.get(owner, Policy()),
        dependencies or {},
        **options,
    )


def busy(n_free: int, n_gpus: int = 4) -> Capacity:
    """A host of ``n_gpus`` plain GPUs of which all but ``n_free`` are held by ``x…``."""
    held = [Allocation(f"x{i}", f"GPU-{i}", f"GPU-{i}", "gpu", 1.0) for i in range(n_gpus - n_free)]
    return Capacity([plain(i) for i in range(n_gpus)], held)


def test_fifo_is_oldest_first_whatever_the_order_given():
    capacity = busy(2)
    result = run(
        [pend("b", at=2, gpus=1), pend("c", at=3, gpus=1), pend("a", at=1, gpus=1)], capacity
    )
    assert list(result.placed) == ["a", "b"]
    assert result.placed["a"] == [Allocation("a", "GPU-2", "GPU-2", "gpu", 1.0)]
    assert result.waiting == {"c": [CheckFailure("devices", "waiting for 1 GPU: 0 of 4 GPUs free")]}
    assert result.positions == {"c": 1}
    assert result.attempted == {"c"}
    assert result.usage["ada"] == OwnerUsage(sessions=2, gpus=2.0)
    assert capacity.holders()["GPU-3"] == ["b"]


def test_fifo_is_strict_a_head_that_does_not_fit_blocks_those_behind_it():
    capacity = busy(2)
    pending = [pend("a", at=1, gpus=3), pend("b", at=2, gpus=1), pend("c", at=3, gpus=1)]
    result = run(pending, capacity)
    assert result.placed == {}
    assert result.waiting["a"] == [CheckFailure("devices", "waiting for 3 GPUs: 2 of 4 GPUs free")]
    assert result.waiting["b"] == [
        CheckFailure(
            "devices",
            "queued behind session a, first in line and waiting for 3 GPUs: 2 of 4 GPUs free",
        )
    ]
    assert result.positions == {"a": 1, "b": 2, "c": 3}
    assert result.attempted == {"a"}
    assert capacity.allocations("b") == []


def test_fifo_passes_over_a_head_that_failed_max_head_attempts_passes():
    pending = [
        pend("a", at=1, attempts=3, gpus=3),
        pend("b", at=2, gpus=1),
        pend("c", at=3, gpus=2),
    ]
    result = run(pending, busy(2), max_head_attempts=3)
    assert list(result.placed) == ["b"]
    assert "passed over after 3 passes" in result.waiting["a"][0].message
    # c is the new head: it does not fit either, and has not failed before, so it waits.
    assert result.waiting["c"] == [CheckFailure("devices", "waiting for 2 GPUs: 1 of 4 GPUs free")]
    assert result.positions == {"a": 1, "c": 2}

    result = run(pending, busy(2), max_head_attempts=4)
    assert result.placed == {}


def test_fifo_sessions_held_back_by_a_limit_a_dependency_or_the_host_do_not_block():
    pending = [
        pend("limited", owner="bob", at=1, gpus=1),
        pend("dependent", at=2, depends_on=["job"], gpus=1),
        pend("never", at=3, gpus=8),
        pend("fits", at=4, gpus=1),
    ]
    result = run(
        pending,
        busy(1),
        usage={"bob": OwnerUsage(sessions=1, gpus=1.0)},
        policies={"bob": Policy(max_concurrent_sessions=1)},
        dependencies={"job": (S.RUNNING, None)},
    )
    assert list(result.placed) == ["fits"]
    assert result.waiting["limited"] == [
        CheckFailure(
            "max_concurrent_sessions",
            "bob already has 1 of 1 concurrent sessions (max_concurrent_sessions)",
        )
    ]
    assert result.waiting["dependent"] == [
        CheckFailure("dependencies", "waiting for session job to finish (it is RUNNING)")
    ]
    assert result.waiting["never"] == [
        CheckFailure(
            "devices", "can never start on this host: it asks for 8 GPUs, but this host has 4"
        )
    ]
    assert result.positions == {"limited": 1, "dependent": 2, "never": 3}


def test_policy_limits_count_what_this_pass_already_placed():
    policies = {
        "ada": Policy(max_gpus=2.0),
        "bob": Policy(max_cpus=4.0),
        "cy": Policy(max_memory=8 * GiB),
    }
    pending = [
        pend("a1", "ada", 1, gpus=1),
        pend("a2", "ada", 2, gpu_share=0.5),
        pend("a3", "ada", 3, cpus=32.0),  # no GPU: max_gpus does not hold it back
        pend("b1", "bob", 4, cpus=3.0),
        pend("b2", "bob", 5, cpus=2.0),
        pend("b3", "bob", 6, gpu_share=0.25),  # asks no CPUs: counts 0
        pend("c1", "cy", 7, memory=6 * GiB),
        pend("c2", "cy", 8, memory=4 * GiB),
    ]
    result = run(
        pending,
        Capacity([plain(i) for i in range(4)]),
        usage={"ada": OwnerUsage(sessions=1, gpus=1.0)},
        policies=policies,
    )
    assert list(result.placed) == ["a1", "a3", "b1", "b3", "c1"]
    assert result.waiting == {
        "a2": [
            CheckFailure("max_gpus", "ada holds 2 of 2 GPUs and this asks for 0.5 more (max_gpus)")
        ],
        "b2": [
            CheckFailure("max_cpus", "bob holds 3 of 4 CPUs and this asks for 2 more (max_cpus)")
        ],
        "c2": [
            CheckFailure(
                "max_memory",
                "cy holds 6GiB of 8GiB memory and this asks for 4GiB more (max_memory)",
            )
        ],
    }
    assert result.attempted == set()
    assert result.usage["ada"] == OwnerUsage(sessions=3, gpus=2.0, cpus=32.0)


def test_a_session_over_several_limits_hears_of_each():
    result = run(
        [pend("a", gpus=2, cpus=8.0)],
        busy(4),
        usage={"ada": OwnerUsage(sessions=2, gpus=1.0, cpus=1.0)},
        policies={"ada": Policy(max_concurrent_sessions=2, max_gpus=2.0, max_cpus=4.0)},
    )
    assert [f.check for f in result.waiting["a"]] == [
        "max_concurrent_sessions",
        "max_gpus",
        "max_cpus",
    ]


@pytest.mark.parametrize(
    ("state", "outcome"),
    [
        ((S.TERMINATED, 0), "placed"),
        ((S.TERMINATED, 1, "prep"), "dependency-failed: prep (job) exited with code 1"),
        ((S.TERMINATED, None), "dependency-failed: job terminated with an unknown exit code"),
        ((S.CANCELLED, None), "dependency-failed: job was cancelled"),
        ((S.ERROR, 137), "dependency-failed: job failed (ERROR, exit code 137)"),
        ((S.RUNNING, None), "waiting for session job to finish (it is RUNNING)"),
        ((S.PENDING, None), "waiting for session job to finish (it is PENDING)"),
        (None, "waiting for session job, whose status is not known"),
    ],
)
def test_dependencies_run_cancel_or_wait(state, outcome):
    dependencies = {"other": (S.TERMINATED, 0)}
    if state is not None:
        dependencies["job"] = state
    for strategy in ("fifo", "drf"):
        pending = [pend("next", depends_on=["other", "job"], gpus=1)]
        result = run(pending, busy(1), dependencies=dependencies, strategy=strategy)
        if outcome == "placed":
            assert list(result.placed) == ["next"]
        elif outcome.startswith("waiting"):
            assert result.waiting == {"next": [CheckFailure("dependencies", outcome)]}
            assert result.positions == {"next": 1}
        else:
            assert result.cancelled == {"next": outcome}
            assert result.waiting == {} and result.positions == {}


def test_a_cancellation_reaches_dependents_of_dependents_in_the_same_pass():
    pending = [
        pend("c", at=3, depends_on=["b"]),
        pend("b", at=2, depends_on=["a"]),
        pend("other", at=4, depends_on=["b", "done"]),
    ]
    dependencies = {"a": (S.ERROR, None), "b": (S.PENDING, None), "done": (S.TERMINATED, 0)}
    result = run(pending, busy(0), dependencies=dependencies)
    assert result.cancelled == {
        "b": "dependency-failed: a failed (ERROR)",
        "c": "dependency-failed: b was cancelled",
        "other": "dependency-failed: b was cancelled",
    }
    assert result.waiting == {}


def test_drf_interleaves_two_owners_as_gpus_free_one_at_a_time():
    def served_order(strategy):
        capacity = busy(0, n_gpus=6)
        pending = [pend(f"A{n}", "A", at=n, gpus=1) for n in range(3)]
        pending += [pend(f"B{n}", "B", at=3 + n, gpus=1) for n in range(3)]
        usage: dict[str, OwnerUsage] = {}
        order = []
        totals = HostTotals(gpus=6.0, cpus=64.0, memory=256 * GiB)
        for n in range(6):
            capacity.release(f"x{n}")
            result = run(pending, capacity, usage=usage, strategy=strategy, totals=totals)
            assert len(result.placed) == 1
            order.extend(result.placed)
            usage = result.usage  # the placed sessions keep running
            pending = [p for p in pending if p.id not in result.placed]
        return order

    assert served_order("drf") == ["A0", "B0", "A1", "B1", "A2", "B2"]
    assert served_order("fifo") == ["A0", "A1", "A2", "B0", "B1", "B2"]


def test_drf_in_one_pass_serves_the_owner_with_the_lowest_dominant_share():
    pending = [pend(f"A{n}", "A", at=n, gpus=1) for n in range(3)]
    pending += [pend(f"B{n}", "B", at=3 + n, gpus=1) for n in range(3)]
    result = run(pending, busy(4), strategy="drf")
    assert list(result.placed) == ["A0", "B0", "A1", "B1"]
    assert result.positions == {"A2": 1, "B2": 2}
    # B already holds a quarter of the host's CPUs (its dominant share): A goes first.
    result = run(pending, busy(3), strategy="drf", usage={"B": OwnerUsage(1, 0.0, 16.0, 0)})
    assert list(result.placed) == ["A0", "A1", "B0"]


def test_drf_positions_follow_dominant_shares_not_age():
    pending = [pend(f"A{n}", "A", at=n, gpus=1) for n in range(3)]
    pending += [pend(f"B{n}", "B", at=3 + n, gpus=1) for n in range(2)]
    result = run(pending, busy(0), strategy="drf", usage={"A": OwnerUsage(1, 1.0)})
    assert result.placed == {}
    assert result.positions == {"B0": 1, "A0": 2, "B1": 3, "A1": 4, "A2": 5}
    assert result.attempted == set(result.positions)


def test_drf_sets_aside_an_owner_whose_sessions_do_not_fit_and_takes_their_oldest_that_does():
    pending = [
        pend("A0", "A", at=0, gpus=2),
        pend("A1", "A", at=1, gpu_profile="1g.10gb"),
        pend("B0", "B", at=2, gpus=1),
        pend("A2", "A", at=3, gpus=1),
    ]
    result = run(pending, busy(1), strategy="drf")
    # A goes first (older): A0 and A1 cannot be placed, A2 can.
    assert list(result.placed) == ["A2"]
    assert set(result.waiting) == {"A0", "A1", "B0"}
    assert result.waiting["A1"][0].message.startswith("can never start on this host")


def test_an_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown scheduling strategy"):
        run([], busy(1), strategy="lottery")


def test_sessions_without_gpus_are_placed_with_no_devices():
    result = run([pend("a", cpus=1.0), pend("b", at=1, gpus=1)], busy(0), strategy="fifo")
    assert result.placed == {"a": []}
    assert result.positions == {"b": 1}


# -- properties ----------------------------------------------------------------------------

LAYOUTS = (
    ("1g.10gb",) * 7,
    ("3g.40gb", "3g.40gb", "1g.10gb"),
    ("2g.20gb", "2g.20gb", "2g.20gb", "1g.10gb"),
    ("7g.80gb",),
)
PROFILES = ("1g.10gb", "2g.20gb", "3g.40gb", "7g.80gb", "4g.40gb")
SHARES = (0.05, 0.1, 0.25, 0.3, 1 / 3, 0.5, 0.75, 0.9)


@st.composite
def inventories(draw):
    kinds = draw(st.lists(st.sampled_from([None, None, None, *LAYOUTS]), max_size=6))
    return [plain(i) if layout is None else mig(i, *layout) for i, layout in enumerate(kinds)]


requests = st.one_of(
    st.integers(1, 4).map(lambda n: ResourceRequest(gpus=n)),
    st.sampled_from(PROFILES).map(profile),
    st.sampled_from(SHARES).map(share),
    st.sampled_from(SHARES).map(share),
)
operations = st.lists(
    st.one_of(
        requests.map(lambda r: ("request", r)),
        requests.map(lambda r: ("request", r)),
        st.integers(0, 50).map(lambda n: ("release", n)),
    ),
    min_size=1,
    max_size=60,
)


def assert_consistent(devices: list[GPUDevice], allocations: list[Allocation]) -> None:
    """The invariants, checked from the allocations alone."""
    plain_gpus = {d.uuid for d in devices if not d.mig_enabled}
    instances = {m.uuid: d.uuid for d in devices for m in d.mig_instances}
    whole = Counter(a.device_uuid for a in allocations if a.kind == "gpu")
    migs = Counter(a.device_uuid for a in allocations if a.kind == "mig")
    shares: dict[str, float] = defaultdict(float)
    for a in allocations:
        assert a.kind in ("gpu", "mig", "share")
        if a.kind == "gpu":
            assert a.gpu_uuid == a.device_uuid in plain_gpus
        elif a.kind == "mig":
            assert instances[a.device_uuid] == a.gpu_uuid
        else:
            assert a.gpu_uuid == a.device_uuid in plain_gpus
            shares[a.gpu_uuid] += a.fraction
    assert all(n == 1 for n in whole.values()), "a whole GPU held twice"
    assert all(n == 1 for n in migs.values()), "a MIG instance held twice"
    assert not set(whole) & set(shares), "a whole GPU also carries shares"
    assert all(total <= 1 + 1e-9 for total in shares.values()), shares
    assert len(whole) + len(shares) <= len(plain_gpus)
    assert len(migs) <= len(instances)
    assert sum(a.fraction for a in allocations) <= len(devices) + 1e-9


def fits(devices: list[GPUDevice], allocations: list[Allocation], request: ResourceRequest):
    """Whether ``request`` fits, by brute force over the allocations."""
    used = {a.device_uuid for a in allocations if a.kind != "share"}
    shared: dict[str, float] = defaultdict(float)
    for a in allocations:
        if a.kind == "share":
            shared[a.gpu_uuid] += a.fraction
    untouched = [d for d in devices if not d.mig_enabled and d.uuid not in used | set(shared)]
    if request.gpu_kind == "gpu":
        return len(untouched) >= request.gpus
    if request.gpu_kind == "mig":
        return any(
            m.profile == request.gpu_profile and m.uuid not in used
            for d in devices
            for m in d.mig_instances
        )
    return any(
        not d.mig_enabled and d.uuid not in used and shared[d.uuid] + request.gpu_share <= 1 + 1e-9
        for d in devices
    )


def check_placement(devices, allocations, request, placed):
    """``placed`` follows the rules: the right kind, and the packing preferences."""
    used = {a.device_uuid for a in allocations if a.kind != "share"}
    shared: dict[str, float] = defaultdict(float)
    for a in allocations:
        if a.kind == "share":
            shared[a.gpu_uuid] += a.fraction
    if request.gpu_kind == "gpu":
        assert len(placed) == request.gpus
        assert all(a.kind == "gpu" and a.device_uuid not in shared for a in placed)
    elif request.gpu_kind == "mig":
        (a,) = placed
        parent = next(d for d in devices if d.uuid == a.gpu_uuid)
        instance = next(m for m in parent.mig_instances if m.uuid == a.device_uuid)
        assert a.kind == "mig" and instance.profile == request.gpu_profile
        assert a.fraction == pytest.approx(int(request.gpu_profile[0]) / 7)

        def busy_slices(d):
            return sum(int(m.profile[0]) for m in d.mig_instances if m.uuid in used)

        candidates = [
            d
            for d in devices
            if any(m.profile == request.gpu_profile and m.uuid not in used for m in d.mig_instances)
        ]
        assert busy_slices(parent) == max(busy_slices(d) for d in candidates)
    else:
        (a,) = placed
        assert a.kind == "share" and a.fraction == request.gpu_share
        room = {
            d.uuid: 1 - shared[d.uuid]
            for d in devices
            if d.uuid in shared
            and d.uuid not in used
            and shared[d.uuid] + request.gpu_share <= 1 + 1e-9
        }
        if room:  # best fit among GPUs already split
            assert room.get(a.gpu_uuid) == pytest.approx(min(room.values()))
        else:
            assert a.gpu_uuid not in shared


def conflicts(devices, capacity: Capacity) -> list[Allocation]:
    """Allocations that must be refused given what ``capacity`` holds now."""
    out = []
    shared: dict[str, float] = defaultdict(float)
    for a in capacity.allocations():
        if a.kind == "gpu":
            out.append(Allocation("intruder", a.gpu_uuid, a.gpu_uuid, "gpu", 1.0))
            out.append(Allocation("intruder", a.gpu_uuid, a.gpu_uuid, "share", 0.05))
        elif a.kind == "mig":
            out.append(Allocation("intruder", a.gpu_uuid, a.device_uuid, "mig", a.fraction))
        else:
            shared[a.gpu_uuid] += a.fraction
            out.append(Allocation("intruder", a.gpu_uuid, a.gpu_uuid, "gpu", 1.0))
    for uuid, total in shared.items():
        out.append(Allocation("intruder", uuid, uuid, "share", min(1.0, 1 - total + 0.02)))
    for d in devices:
        if d.mig_enabled:
            out.append(Allocation("intruder", d.uuid, d.uuid, "gpu", 1.0))
            out.append(Allocation("intruder", d.uuid, d.uuid, "share", 0.1))
    return out


def snapshot(capacity: Capacity):
    return capacity.allocations(), capacity.holders(), capacity.free_summary()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(devices=inventories(), ops=operations, data=st.data())
def test_the_allocator_keeps_its_invariants_through_any_requests_and_releases(devices, ops, data):
    capacity = Capacity(devices)
    sessions: list[str] = []
    for n, (op, arg) in enumerate(ops):
        if op == "release":
            if sessions:
                session_id = sessions.pop(arg % len(sessions))
                assert capacity.release(session_id)
        else:
            held = capacity.allocations()
            placed = capacity.place(arg, f"s{n}")
            assert (placed is not None) == fits(devices, held, arg), capacity.free_summary(arg)
            if placed is not None:
                check_placement(devices, held, arg, placed)
                capacity.take(placed)
                sessions.append(f"s{n}")
            elif capacity.unsatisfiable(arg) is None:
                assert fits(devices, [], arg)  # it fits an empty host
            else:
                assert not fits(devices, [], arg)
        assert_consistent(devices, capacity.allocations())
        refused = conflicts(devices, capacity)
        if refused:
            conflict = data.draw(st.sampled_from(refused))
            before = snapshot(capacity)
            with pytest.raises(ValueError):
                capacity.take([conflict])
            assert snapshot(capacity) == before
    # Rebuilt from its allocations, a capacity answers the same.
    rebuilt = Capacity(devices, capacity.allocations())
    assert snapshot(rebuilt) == snapshot(capacity)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    devices=inventories(),
    queue=st.lists(st.tuples(st.sampled_from("abc"), requests), max_size=25),
    strategy=st.sampled_from(["fifo", "drf"]),
    releases=st.lists(st.integers(0, 100), min_size=3, max_size=3),
    attempts=st.integers(0, 4),
)
def test_schedule_never_breaks_the_allocator_invariants(
    devices, queue, strategy, releases, attempts
):
    capacity = Capacity(devices)
    pending = [
        PendingSession(f"p{n}", owner, request, created_at=float(n), attempts=attempts)
        for n, (owner, request) in enumerate(queue)
    ]
    usage: dict[str, OwnerUsage] = {}
    running: list[str] = []
    totals = HostTotals(gpus=float(len(devices) or 1), cpus=64.0, memory=256 * GiB)
    for release in releases:
        before = capacity.allocations()
        result = run(pending, capacity, usage=usage, strategy=strategy, totals=totals)
        after = capacity.allocations()
        assert_consistent(devices, after)
        assert sorted(map(repr, after)) == sorted(
            map(repr, before + [a for held in result.placed.values() for a in held])
        )
        assert set(result.placed) | set(result.waiting) == {p.id for p in pending}
        assert not set(result.placed) & set(result.waiting)
        assert sorted(result.positions.values()) == list(range(1, len(result.waiting) + 1))
        for p in pending:
            if p.id in result.placed:
                kinds = {a.kind for a in result.placed[p.id]}
                assert kinds <= {p.request.gpu_kind}
        usage = result.usage
        running += list(result.placed)
        pending = [p for p in pending if p.id not in result.placed]
        if running:
            capacity.release(running.pop(release % len(running)))


def test_fifo_never_passes_over_a_head_no_larger_than_what_waits_behind_it():
    """Every request behind the head asks for the same GPU it waits for: however many
    passes it has failed, it is not "passed over", and it starts first when a GPU frees."""
    pending = [pend("a", at=1, gpus=1, attempts=49)] + [
        pend(f"b{i}", at=2 + i, gpus=1) for i in range(3)
    ]
    result = run(pending, busy(0))
    assert result.placed == {}
    assert result.waiting["a"] == [CheckFailure("devices", "waiting for 1 GPU: 0 of 4 GPUs free")]
    freed = run(pending, busy(1))
    assert list(freed.placed) == ["a"]


def test_fifo_passes_over_a_big_head_only_when_someone_smaller_starts():
    pending = [pend("a", at=1, gpus=2, attempts=3), pend("b", at=2, gpus=1)]
    result = run(pending, busy(1))
    assert list(result.placed) == ["b"]
    assert "passed over after 3 passes" in result.waiting["a"][0].message
