"""Every Jupyter client sees a container kernel as a kernel: nbclient, the protocol test
suite, and jupyter_server's sessions API."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import jupyter_kernel_test as jkt
import nbformat
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

from .support import REPO, labelled_containers, make_notebook_dir


def test_nbclient_executes_a_notebook_on_the_container_kernel(
    kernel_image, notebook_dir, docker_client
):
    (notebook_dir / "numbers.txt").write_text("1 2 3 4\n")
    nb = new_notebook(
        cells=[
            new_code_cell("import numpy as np\nvalues = np.loadtxt('numbers.txt')"),
            new_code_cell("print(values.sum())"),
            new_code_cell("import os; os.getuid() != 0"),
        ],
        metadata={
            "kernelspec": {"name": "python3-container", "display_name": "", "language": "python"}
        },
    )
    client = NotebookClient(
        nb,
        timeout=60,
        kernel_name="python3-container",
        resources={"metadata": {"path": str(notebook_dir)}},
    )
    client.execute()
    assert nb.cells[1].outputs[0]["text"] == "10.0\n"
    assert nb.cells[2].outputs[0]["data"]["text/plain"] == "True"
    assert client.km is None or not client.km.has_kernel
    nbformat.validate(nb)


class _PythonKernelProtocol:
    """The protocol checks of jupyter_kernel_test, as its own suite runs them on ipykernel."""

    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    code_page_something = "zip?"
    code_generate_error = "raise"
    code_execute_result = [
        {"code": "1+2+3", "result": "6"},
        {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"},
    ]
    code_display_data = [
        {
            "code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))",
            "mime": "text/html",
        },
        {
            "code": "from IPython.display import Math, display; display(Math('\\\\frac{1}{2}'))",
            "mime": "text/latex",
        },
    ]
    code_history_pattern = "1?2*"
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"

    def test_history(self) -> None:
        # jupyter_kernel_test's range check expects the stored session number back, but
        # IPython 9 answers 0 ("the current session"), on a local ipykernel alike. So tail
        # and search are checked as jupyter_kernel_test does, and range as IPython answers.
        codes = [sample["code"] for sample in self.code_execute_result]
        tail = self.history_helper(codes, output=False, raw=True, hist_access_type="tail", n=2)
        assert [entry[2] for entry in tail["content"]["history"]] == codes
        session, start = tail["content"]["history"][0][:2]
        reply = self.history_helper(
            [],
            output=False,
            raw=True,
            hist_access_type="range",
            session=session,
            start=start,
            stop=start + 2,
        )
        assert [entry[1:] for entry in reply["content"]["history"]] == [
            [start, codes[0]],
            [start + 1, codes[1]],
        ]
        found = self.history_helper(
            codes,
            output=False,
            raw=True,
            hist_access_type="search",
            pattern=self.code_history_pattern,
            unique=True,
        )
        assert len(found["content"]["history"]) == 1

    @classmethod
    def setUpClass(cls) -> None:
        cls.workdir = tempfile.mkdtemp(prefix="jgs-kernel-test-")
        make_notebook_dir(Path(cls.workdir))
        cls.km, cls.kc = start_new_kernel(kernel_name=cls.kernel_name, cwd=cls.workdir)

    @classmethod
    def tearDownClass(cls) -> None:
        super().tearDownClass()
        shutil.rmtree(cls.workdir, ignore_errors=True)


@pytest.mark.usefixtures("kernel_image")
class TestContainerKernelProtocol(_PythonKernelProtocol, jkt.KernelTests):
    kernel_name = "python3-container"


class TestLocalIPyKernelProtocol(_PythonKernelProtocol, jkt.KernelTests):
    """The same checks on a plain local ipykernel: the baseline the container must match."""

    kernel_name = "python3"


@pytest.fixture
def container_kernelspec(jp_data_dir):
    """The shipped python3-container spec, where the test server's kernelspec manager looks."""
    target = jp_data_dir / "kernels" / "python3-container"
    target.mkdir(parents=True)
    shutil.copy(REPO / "provisioners" / "python3-container" / "kernel.json", target)
    return "python3-container"


async def test_the_sessions_api_runs_a_notebook_kernel_in_a_container(
    jp_fetch, jp_serverapp, jp_root_dir, container_kernelspec, kernel_image, docker_client
):
    make_notebook_dir(jp_root_dir)
    body = {
        "path": "analysis.ipynb",
        "name": "analysis.ipynb",
        "type": "notebook",
        "kernel": {"name": container_kernelspec},
    }
    response = await jp_fetch("api", "sessions", method="POST", body=json.dumps(body))
    assert response.code == 201
    session = json.loads(response.body)
    kernel_id = session["kernel"]["id"]

    km = jp_serverapp.kernel_manager.get_kernel(kernel_id)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        reply = await kc.execute_interactive("import os; x = os.getcwd()", timeout=30)
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
    (container,) = labelled_containers(docker_client, **{"kernel-id": kernel_id})
    assert container.attrs["Config"]["WorkingDir"] == str(jp_root_dir)
    assert (
        container.attrs["Config"]["Env"].count(f"JPY_SESSION_NAME={jp_root_dir}/analysis.ipynb")
        == 1
    )

    response = await jp_fetch("api", "sessions", session["id"], method="DELETE")
    assert response.code == 204
    assert labelled_containers(docker_client, **{"kernel-id": kernel_id}) == []
