"""The one command layer behind ``%session``/``%vfolder`` and ``jupyter gpu-sessions
session|vfolder``: argparse forms, API calls, and render objects. A user error never exits
or prints a traceback: it becomes a :class:`CommandError` with one line to show."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .client import APIError, Client, NoServer, own_info, own_session_id
from .render import (
    TERMINAL,
    Outcome,
    Output,
    Text,
    gpus_table,
    graph_of_sessions,
    graph_table,
    graph_tree,
    quota_table,
    session_info,
    sessions_table,
    short_id,
    vfolder_fields,
    vfolders_table,
)

STATUSES = (
    "PENDING",
    "PREPARING",
    "RUNNING",
    "RESTARTING",
    "TERMINATING",
    "TERMINATED",
    "CANCELLED",
    "ERROR",
)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PERMISSIONS = ("ro", "rw", "wd")

SESSION_FORMS = """\
Forms:
  list [--all] [--status S]     my sessions not ended yet (--all: ended ones too;
                                --status RUNNING,PENDING: only those)
  info [NAME]                   one session (default: this kernel's own): GPUs with
                                their live memory use, limits, mounts, status history;
                                for a queued session its place, what it waits for and
                                which limit holds it
  start NAME [--image I] [--gpus N] [--cpus C] [--memory M] [--vfolder V[:ro]]...
        [--depends-on A ...] [--env K=V]... -- COMMAND
                                a batch session running COMMAND once every dependency
                                ended successfully
  run ...                       the same as start, then wait and stream its logs;
                                shows the exit status (Ctrl-C stops waiting only)
  logs NAME [--follow] [--tail N]
                                the session's log (--follow: until it ends)
  rm NAME [--recursive]         end a session (--recursive: and what depends on it)
  show-graph [NAME] [--table]   the dependency graph as a tree (a session with two
                                parents appears under both); --table: topological
                                order, earliest first (default: this kernel's session,
                                or all my sessions with dependencies)
  gpus                          the GPUs, who holds them and how much each session uses
  quota                         my limits and what I use against them
NAME is a session name (my newest of that name) or a 32-hex session id.
Add --help after a form for its options."""

VFOLDER_FORMS = """\
Forms:
  list [--trash]                vfolders I can use (--trash: my trashed ones)
  create NAME [--quota 10GiB] [--project GROUP]
                                a new vfolder (--project: a group's, admins only)
  info NAME                     one vfolder: owner, quota, usage, my permission
  share NAME USER --perm ro|rw|wd
                                invite USER (they accept the invitation)
  clone SRC DST                 copy vfolder SRC into a new vfolder DST
  rm NAME                       move to the trash (restore brings it back)
  restore NAME                  bring a trashed vfolder back
Add --help after a form for its options."""


class CommandError(Exception):
    """One line for the user. ``usage``: the command line was wrong (CLI exit status 2)."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.usage = usage

    def __str__(self) -> str:
        return self.message


class _HelpShown(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing and exiting."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self._printed: list[str] = []

    def error(self, message: str):  # type: ignore[override]
        raise CommandError(f"{self.prog}: {message} (see {self.prog} --help)", usage=True)

    def exit(self, status: int = 0, message: str | None = None):  # type: ignore[override]
        raise _HelpShown("".join(self._printed) + (message or ""))

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:
            self._printed.append(message)


# -- argument types (their messages are what the user sees) -------------------------------
def _name(value: str) -> str:
    if not NAME_RE.match(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a session name: use letters, digits, '.', '_' and '-' "
            "(up to 64, starting with a letter or digit)"
        )
    return value


def _count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is negative")
    return n


def _positive(value: str) -> int:
    n = _count(value)
    if n == 0:
        raise argparse.ArgumentTypeError("0 is not allowed: give at least 1")
    return n


def _cpus(value: str) -> float:
    try:
        n = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a number of CPUs (e.g. 2 or 0.5)"
        ) from None
    if not n > 0 or n != n or n == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} must be more than 0")
    return n


def _size(value: str) -> str:
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*([KMGTP]i?B?|B)?\s*", value, re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"{value!r} is not a size: use e.g. 512MiB, 16GiB")
    return value.strip()


def _env(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise argparse.ArgumentTypeError(f"{value!r} is not KEY=VALUE")
    return key, val


def _statuses(value: str) -> str:
    wanted = [s.strip().upper() for s in value.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STATUSES]
    if not wanted or unknown:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a status: use one or more of {', '.join(STATUSES)} (comma-separated)"
        )
    return ",".join(wanted)


def _vfolder_spec(value: str) -> str:
    name, sep, perm = value.partition(":")
    if not NAME_RE.match(name) or (sep and perm not in PERMISSIONS):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a vfolder mount: use NAME or NAME:ro (or :rw, :wd)"
        )
    return value


# -- the parsers ---------------------------------------------------------------------------
def session_parser(prog: str) -> _Parser:
    parser = _Parser(
        prog=prog,
        description="See and steer your GPU sessions.",
        epilog=SESSION_FORMS,
    )
    sub = parser.add_subparsers(dest="command", metavar="FORM")
    p = sub.add_parser("list", help="my sessions")
    p.add_argument("--all", action="store_true", help="ended sessions too")
    p.add_argument("--status", type=_statuses, help="only these statuses (comma-separated)")
    p.add_argument("--limit", type=_positive, default=100, help="at most this many (100)")

    p = sub.add_parser("info", help="one session (default: this kernel's own)")
    p.add_argument("name", nargs="?", metavar="NAME")

    for form, what in (
        ("start", "start a batch session"),
        ("run", "start a batch session, wait for it and stream its logs"),
    ):
        p = sub.add_parser(form, help=what, usage=f"{prog} {form} NAME [options] -- COMMAND")
        p.add_argument("name", type=_name, metavar="NAME")
        p.add_argument("--image", help="container image (default: the default kernel image)")
        p.add_argument("--gpus", type=_count, help="whole GPUs")
        p.add_argument("--cpus", type=_cpus, help="CPU limit, e.g. 2 or 0.5")
        p.add_argument("--memory", type=_size, help="memory limit, e.g. 16GiB")
        p.add_argument(
            "--vfolder",
            action="append",
            type=_vfolder_spec,
            default=[],
            metavar="V[:ro]",
            help="mount a vfolder (repeat for several)",
        )
        p.add_argument(
            "--depends-on",
            nargs="+",
            action="extend",
            default=[],
            metavar="A",
            help="sessions (names or ids) that must end successfully first",
        )
        p.add_argument(
            "--env", action="append", type=_env, default=[], metavar="K=V", help="environment"
        )
        p.add_argument("--runtime", choices=("docker", "local"), help="docker (default) or local")

    p = sub.add_parser("logs", help="a session's log")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--follow", "-f", action="store_true", help="until the session ends")
    p.add_argument("--tail", type=_positive, default=200, help="last lines (200)")

    p = sub.add_parser("rm", help="end a session")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--recursive", "-r", action="store_true", help="and what depends on it")

    p = sub.add_parser("show-graph", help="the dependency graph")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--table", action="store_true", help="topological order, earliest first")

    sub.add_parser("gpus", help="the GPUs and who uses them")
    sub.add_parser("quota", help="my limits and usage")
    return parser


def vfolder_parser(prog: str) -> _Parser:
    parser = _Parser(prog=prog, description="Your storage folders.", epilog=VFOLDER_FORMS)
    sub = parser.add_subparsers(dest="command", metavar="FORM")
    p = sub.add_parser("list", help="vfolders I can use")
    p.add_argument("--trash", action="store_true", help="my trashed vfolders")
    p = sub.add_parser("create", help="a new vfolder")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--quota", type=_size, help="e.g. 10GiB")
    p.add_argument("--project", metavar="GROUP", help="a project vfolder of GROUP (admins)")
    p = sub.add_parser("info", help="one vfolder")
    p.add_argument("name", metavar="NAME")
    p = sub.add_parser("share", help="invite a user")
    p.add_argument("name", metavar="NAME")
    p.add_argument("user", metavar="USER")
    p.add_argument("--perm", required=True, choices=PERMISSIONS, help="ro, rw or wd")
    p = sub.add_parser("clone", help="copy into a new vfolder")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p = sub.add_parser("rm", help="move to the trash")
    p.add_argument("name", metavar="NAME")
    p = sub.add_parser("restore", help="bring back from the trash")
    p.add_argument("name", metavar="NAME")
    return parser


# -- running a command ---------------------------------------------------------------------
@dataclass
class Context:
    """Where a command runs: its program name (``%session`` or ``jupyter gpu-sessions
    session``), how it gets a client, and where streamed lines go."""

    prog: str
    out: Callable[[str], None] = print
    client_factory: Callable[[str], Client] | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    poll_interval: float = 0.5
    sleep: Callable[[float], None] = time.sleep

    def client(self, what: str) -> Client:
        if self.client_factory is not None:
            return self.client_factory(what)
        return Client.from_env(self.environ, what=what)


def split_line(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise CommandError(f"cannot read the line: {exc}", usage=True) from None


def parse(group: str, argv: list[str] | str, prog: str) -> argparse.Namespace | Text:
    """The form ``argv`` names (``.command``; ``.argv``: what follows ``--``), or the help
    text it asked for. Raises :class:`CommandError` with one line."""
    if isinstance(argv, str):
        argv = split_line(argv)
    argv = list(argv)
    if group == "session":
        parser = session_parser(prog)
    elif group == "vfolder":
        parser = vfolder_parser(prog)
    else:
        raise CommandError(f"unknown command group {group!r}: use session or vfolder", usage=True)
    command: list[str] = []
    if argv and argv[0] in ("start", "run") and "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    try:
        args, extra = parser.parse_known_args(argv)
    except _HelpShown as shown:
        return Text(shown.text)
    if args.command is None:
        return Text(parser.format_help())
    if extra:
        where = f"{prog} {args.command}"
        raise CommandError(
            f"{where}: unrecognized arguments: {' '.join(extra)} (see {where} --help)", usage=True
        )
    args.group = group
    args.argv = command
    return args


def run(group: str, argv: list[str] | str, ctx: Context) -> Output | None:
    """Run ``group`` (``session`` or ``vfolder``) with ``argv``: the output to show (None
    when everything was streamed). Raises :class:`CommandError` with one line."""
    args = parse(group, argv, ctx.prog)
    if isinstance(args, Text):
        return args
    handlers = _SESSION if group == "session" else _VFOLDER
    what = f"{ctx.prog} {args.command}"
    try:
        return handlers[args.command](args, ctx, what)
    except NoServer:
        raise CommandError(str(NoServer(what))) from None
    except APIError as exc:
        raise CommandError(f"{what}: {_api_message(exc)}") from None


def _api_message(exc: APIError) -> str:
    message = exc.message.replace("send recursive=true", "use --recursive")
    return " ".join(message.split())


# -- sessions ------------------------------------------------------------------------------


def _list(args: argparse.Namespace, ctx: Context, what: str) -> Output:
    client = ctx.client(what)
    sessions = client.sessions(all=args.all, status=args.status, limit=args.limit)
    return sessions_table(sessions)


def _info(args: argparse.Namespace, ctx: Context, what: str) -> Output:
    own = own_session_id(ctx.environ)
    ref = args.name or own
    try:
        client = ctx.client(what)
    except NoServer:
        if args.name:
            raise
        return _offline_info(ctx, what, note="")
    if not ref:
        raise CommandError(
            f"{what}: say which session (NAME or id): this is not a session's kernel", usage=True
        )
    try:
        session = client.session(ref)
    except APIError as exc:
        if args.name or exc.status not in (0, 401, 403):
            raise
        # The server is gone (or this kernel's token with it): what the provisioner wrote.
        return _offline_info(ctx, what, note=f"(live status unavailable: {_api_message(exc)})")
    info = own_info(ctx.environ) if own and session.get("id") == own else None
    names: dict[str, str] = {}
    if session.get("depends_on"):
        # Dependencies by name, as people gave them (the session names them by id).
        try:
            graph = client.graph(session["id"], direction="up")
            names = {n["id"]: n.get("name") or "" for n in graph.get("nodes", ())}
        except APIError:
            pass  # ids then
    return session_info(session, info, dependency_names=names)


def _offline_info(ctx: Context, what: str, note: str) -> Output:
    info = own_info(ctx.environ)
    if info is None:
        raise CommandError(
            f"{what}: this kernel was not started by jupyter-gpu-sessions (no "
            "JUPYTER_GPU_SESSIONS_INFO): there is no session to describe"
        )
    return session_info(None, info, note=note or "(from the kernel's start; no live status)")


def start_spec(args: argparse.Namespace, prog: str) -> dict[str, Any]:
    if not args.argv:
        raise CommandError(
            f"{prog}: give the command after --, e.g. {prog} {args.name} -- python3 train.py",
            usage=True,
        )
    command: list[str] | str = list(args.argv)
    if len(command) == 1 and re.search(r"[\s;&|<>$`]", command[0]):
        command = command[0]  # one quoted shell line
    spec: dict[str, Any] = {"type": "batch", "name": args.name, "command": command}
    if args.image:
        spec["image"] = args.image
    resources = {
        k: v
        for k, v in (("gpus", args.gpus), ("cpus", args.cpus), ("memory", args.memory))
        if v is not None
    }
    if resources:
        spec["resources"] = resources
    if args.vfolder:
        spec["vfolders"] = list(args.vfolder)
    if args.depends_on:
        spec["depends_on"] = list(args.depends_on)
    if args.env:
        spec["env"] = dict(args.env)
    if args.runtime:
        spec["runtime"] = args.runtime
    return spec


def _start(args: argparse.Namespace, ctx: Context, what: str) -> Output:
    spec = start_spec(args, what)
    session = ctx.client(what).create_session(spec)
    return sessions_table([session])


class LogFollower:
    """New lines of a log read again and again as a tail (the API has no offsets): what
    was not shown yet. Lines repeated verbatim across a moved window are ambiguous; the
    last shown lines (up to ``anchor``) are matched at their last place in the window."""

    def __init__(self, anchor: int = 50) -> None:
        self.shown: list[str] = []
        self.anchor = anchor

    def new_lines(self, text: str) -> list[str]:
        lines = text.splitlines()
        shown = self.shown
        n = len(shown)
        if lines[:n] == shown:  # the whole log so far, and more
            fresh = lines[n:]
        else:
            fresh = lines
            k = min(n, self.anchor)
            tail = shown[-k:]
            for end in range(len(lines), k - 1, -1):  # the window holds the last shown lines
                if lines[end - k : end] == tail:
                    fresh = lines[end:]
                    break
            else:  # the window starts inside them
                for j in range(min(k, len(lines)), 0, -1):
                    if lines[:j] == shown[-j:]:
                        fresh = lines[j:]
                        break
        shown.extend(fresh)
        if len(shown) > 20000:
            del shown[:10000]
        return fresh


def _follow(
    client: Client,
    session_id: str,
    ctx: Context,
    *,
    start_tail: int = 10_000,
    announce_queue: bool = True,
) -> dict[str, Any]:
    """Stream ``session_id``'s log until it ends; its last JSON."""
    follower = LogFollower()
    last_message = None
    tail = start_tail
    while True:
        session = client.session(session_id)
        status = session["status"]
        if status == "PENDING":
            message = session.get("queue_message") or "queued"
            if announce_queue and message != last_message:
                ctx.out(message)
                last_message = message
        elif status != "CANCELLED":
            try:
                text = client.logs(session_id, tail=tail)["logs"] or ""
            except APIError as exc:
                if exc.status != 409:
                    raise
                text = ""
            tail = 10_000
            for line in follower.new_lines(text):
                ctx.out(line)
        if status in TERMINAL:
            return session
        ctx.sleep(ctx.poll_interval)


def _run(args: argparse.Namespace, ctx: Context, what: str) -> Output:
    spec = start_spec(args, what)
    client = ctx.client(what)
    session = client.create_session(spec)
    sid, name = session["id"], session.get("name") or session["id"][:12]
    ctx.out(f"Session {name} ({short_id(sid)}) created: waiting for it (Ctrl-C stops waiting).")
    try:
        final = _follow(client, sid, ctx)
    except KeyboardInterrupt:
        return Outcome(
            f"Stopped waiting: session {name} ({short_id(sid)}) keeps running. "
            f"Follow it with `{ctx.prog} logs {name} --follow`, end it with "
            f"`{ctx.prog} rm {name}`.",
            130,
        )
    return _outcome(final)


def _outcome(session: Mapping[str, Any]) -> Outcome:
    name = session.get("name") or short_id(session.get("id"))
    status, code = session["status"], session.get("exit_code")
    label = f"Session {name} ({short_id(session.get('id'))}) {status}"
    if status == "TERMINATED" and code == 0:
        return Outcome(f"{label}: exit code 0 (success).", 0)
    reason = session.get("reason") or ""
    if code is not None:
        text = f"{label}: exit code {code}" + (f" ({reason})" if reason else "") + "."
        return Outcome(text, code if 0 < code < 256 else 1)
    return Outcome(f"{label}" + (f": {reason}" if reason else "") + ".", 1)


def _logs(args: argparse.Namespace, ctx: Context, what: str) -> Output | None:
    client = ctx.client(what)
    if not args.follow:
        return Text(client.logs(args.name, tail=args.tail)["logs"] or "(no output yet)")
    session = client.session(args.name)
    try:
        final = _follow(client, session["id"], ctx, start_tail=args.tail)
    except KeyboardInterrupt:
        ctx.out(f"Stopped following; session {args.name} keeps running.")
        return None
    return _outcome(final)


def _rm(args: argparse.Namespace, ctx: Context, what: str) -> Output:
    answer = ctx.client(what).end_session(args.name, recursive=args.recursive)
    ended = answer.get("ended", []) if isinstance(answer, dict) else []
    return sessions_table(ended, title=f"Ended {len(ended)} session(s):")


# -- graphs --------------------------------------------------------------------------------


def _show_graph(args: argparse.Namespace, ctx: Context, what: str) -> Output:
    client = ctx.client(what)
    ref = args.name or own_session_id(ctx.environ)
    graph = None
    if ref:
        graph = client.graph(ref)
    if graph is None or (not args.name and not graph.get("edges")):
        graph = graph_of_sessions(client.sessions(all=True, limit=500))
    return graph_table(graph) if args.table else graph_tree(graph)


# -- GPUs and quota ------------------------------------------------------------------------


def _gpus(args: argparse.Namespace, ctx: Context, what: str) -> Output:
    return gpus_table(ctx.client(what).gpus())


def _quota(args: argparse.Namespace, ctx: Context, what: str) -> Output:
    return quota_table(ctx.client(what).quota())


_SESSION: dict[str, Callable[[argparse.Namespace, Context, str], Output | None]] = {
    "list": _list,
    "info": _info,
    "start": _start,
    "run": _run,
    "logs": _logs,
    "rm": _rm,
    "show-graph": _show_graph,
    "gpus": _gpus,
    "quota": _quota,
}


# -- vfolders ------------------------------------------------------------------------------


def _vf_list(args: argparse.Namespace, ctx: Context, what: str) -> Output:
    return vfolders_table(ctx.client(what).vfolders(trash=args.trash), trash=args.trash)


def _vf_create(args: argparse.Namespace, ctx: Context, what: str) -> Output:
    made = ctx.client(what).create_vfolder(args.name, quota=args.quota, project=args.project)
    return vfolder_fields(made, title=f"Created vfolder {made.get('name')}")


def _vf_info(args: argparse.Namespace, ctx: Context, what: str) -> Output:
    return vfolder_fields(ctx.client(what).vfolder(args.name))


def _vf_share(args: argparse.Namespace, ctx: Context, what: str) -> Output:
    share = ctx.client(what).share_vfolder(args.name, args.user, args.perm)
    return Text(
        f"Invited {share.get('user', args.user)} to vfolder {args.name} "
        f"({share.get('permission', args.perm)}); the invitation is {share.get('state', 'sent')}."
    )


def _vf_clone(args: argparse.Namespace, ctx: Context, what: str) -> Output:
    made = ctx.client(what).clone_vfolder(args.src, args.dst)
    return vfolder_fields(made, title=f"Cloned {args.src} into {made.get('name')}")


def _vf_rm(args: argparse.Namespace, ctx: Context, what: str) -> Output:
    ctx.client(what).delete_vfolder(args.name)
    return Text(
        f"Moved vfolder {args.name} to the trash; `{ctx.prog} restore {args.name}` brings it back."
    )


def _vf_restore(args: argparse.Namespace, ctx: Context, what: str) -> Output:
    restored = ctx.client(what).restore_vfolder(args.name)
    return vfolder_fields(restored, title=f"Restored vfolder {args.name}")


_VFOLDER: dict[str, Callable[[argparse.Namespace, Context, str], Output | None]] = {
    "list": _vf_list,
    "create": _vf_create,
    "info": _vf_info,
    "share": _vf_share,
    "clone": _vf_clone,
    "rm": _vf_rm,
    "restore": _vf_restore,
}
