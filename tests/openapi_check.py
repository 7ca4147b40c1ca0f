"""A pytest plugin (loaded by conftest.py): the OpenAPI fuzz in tests/test_openapi.py must
run every operation of the shipped document, or the run fails.

It guards against runs that collect the fuzz but execute only part of it, as happened
under pytest-xdist when all of schemathesis' items had one node id: the run reported
`1 passed` for 37 operations. The operations that ran are read from the reports (on the
xdist controller too), one per operation label, and compared with the document's
operations less `NOT_FUZZED`. A run that narrows the selection on purpose (`-k`, `-m`,
`--deselect`, `--lf`, a `file::test` argument) is held to the fuzz items it selected
instead.
"""

from __future__ import annotations

import pytest

from jupyter_gpu_sessions.server import openapi_document

FUZZ_TEST = "tests/test_openapi.py::test_the_api_answers_as_its_openapi_document_says"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
# Operations of the document the fuzz leaves out, and why.
NOT_FUZZED = {
    # A websocket: schemathesis speaks plain HTTP only, and a plain GET is just refused with
    # the documented 400. tests/test_server_api.py connects to it.
    "GET /events": "a websocket (tests/test_server_api.py exercises it)",
}
_PROPERTY = "openapi_operation"


def document_operations() -> set[str]:
    """Every operation of the shipped OpenAPI document, as `METHOD /path` labels."""
    paths = openapi_document()["paths"]
    return {f"{m.upper()} {path}" for path, item in paths.items() for m in item if m in METHODS}


def fuzzed_operations() -> set[str]:
    return document_operations() - set(NOT_FUZZED)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_OperationsCheck(config), "jgs-openapi-operations-check")


class _OperationsCheck:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.selected: int | None = None  # fuzz items in the run (duplicate node ids count)
        self.ran: set[str] = set()

    def _count_selected(self, nodeids: list[str]) -> None:
        if self.selected is None:  # each xdist worker reports the same collection
            self.selected = sum(1 for nodeid in nodeids if nodeid.startswith(FUZZ_TEST))

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if session.items:
            self._count_selected([item.nodeid for item in session.items])

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids: list[str]) -> None:
        self._count_selected(ids)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report = yield
        label = getattr(item, "operation_label", None)  # set on schemathesis' items
        if report.when == "call" and label and item.nodeid.startswith(FUZZ_TEST):
            report.user_properties.append((_PROPERTY, label))
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" and not report.skipped:
            self.ran.update(value for name, value in report.user_properties if name == _PROPERTY)

    def _narrowed(self) -> bool:
        config = self.config
        return bool(
            config.getoption("keyword", "")
            or config.getoption("markexpr", "")
            or config.getoption("deselect", None)
            or config.getoption("lf", False)
            or any("::" in arg for arg in config.args)
        )

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput"):  # checked once, on the xdist controller
            return
        if self.config.getoption("collectonly") or self.config.getoption("setuponly", False):
            return  # nothing was meant to run
        if not self.selected:
            return  # the fuzz was not part of this run
        if self._narrowed():
            expected, what = self.selected, "selected operations"
        else:
            expected, what = len(fuzzed_operations()), "operations of the OpenAPI document"
        if len(self.ran) >= expected:
            return
        excluded = "; ".join(f"{op}: {why}" for op, why in NOT_FUZZED.items())
        message = (
            f"\nFAILED: the OpenAPI fuzz ran {len(self.ran)} of the {expected} {what} "
            f"(not fuzzed by design: {excluded})"
        )
        if not self._narrowed():
            message += f"; not run: {', '.join(sorted(fuzzed_operations() - self.ran))}"
        print(message)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
