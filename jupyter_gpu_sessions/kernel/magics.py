"""The ``%session`` and ``%vfolder`` line magics (``%load_ext jupyter_gpu_sessions``)."""

from __future__ import annotations

import sys

from IPython.core.magic import Magics, line_magic, magics_class
from IPython.display import display

from . import commands
from .commands import SESSION_FORMS, VFOLDER_FORMS, CommandError, Context
from .notices import start_notice_watcher


def _out(line: str) -> None:
    print(line, flush=True)


@magics_class
class SessionMagics(Magics):
    def _run(self, group: str, line: str) -> None:
        ctx = Context(prog=f"%{group}", out=_out)
        try:
            result = commands.run(group, line, ctx)
        except CommandError as exc:
            # One line, no traceback: a user error is not a bug.
            print(exc.message, file=sys.stderr, flush=True)
            return None
        if result is not None:
            display(result)
        return None

    @line_magic
    def session(self, line: str) -> None:
        return self._run("session", line)

    @line_magic
    def vfolder(self, line: str) -> None:
        return self._run("vfolder", line)

    session.__doc__ = (
        "See and steer your GPU sessions from a notebook.\n\n"
        "Usage: %session FORM [options]\n\n" + SESSION_FORMS + "\n\nExamples:\n"
        "  %session list --all\n"
        "  %session info\n"
        "  %session start prep --gpus 1 --vfolder data -- python3 prep.py\n"
        "  %session run train --gpus 2 --depends-on prep -- python3 train.py\n"
        "  %session show-graph train --table\n"
        "  %session rm prep --recursive\n\n"
        "Tables show as HTML in JupyterLab and as aligned text in a console; a mistake\n"
        "prints one line. The same forms run in a terminal: jupyter gpu-sessions session ..."
    )
    vfolder.__doc__ = (
        "Your storage folders (vfolders) from a notebook.\n\n"
        "Usage: %vfolder FORM [options]\n\n" + VFOLDER_FORMS + "\n\nExamples:\n"
        "  %vfolder create data --quota 10GiB\n"
        "  %vfolder share data bob --perm ro\n"
        "  %vfolder rm data\n"
        "  %vfolder restore data\n\n"
        "The same forms run in a terminal: jupyter gpu-sessions vfolder ..."
    )


def load_ipython_extension(ipython) -> None:
    ipython.register_magics(SessionMagics)
    # The engine's words to this kernel (a GPU-idle warning), shown as they come.
    start_notice_watcher()
