"""VFolderStore: vfolder records and their shares, with the name and count rules enforced in
one serialized write transaction.

Methods block (database I/O): callers on an event loop go through an executor.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from ..core.errors import Conflict, PolicyViolation
from ..core.vfolders import Permission, Share, VFolder
from .db import read_transaction, write_transaction
from .tables import vfolder_shares, vfolders

# Statuses in which a vfolder's storage exists and may be used or restored.
LIVE = ("ready", "trashed")


def _vfolder(row: Any) -> VFolder:
    return VFolder(
        id=row.id,
        name=row.name,
        type=row.type,
        owner=row.owner,
        group=row.group_name,
        backend=row.backend,
        quota=row.quota,
        cloneable=bool(row.cloneable),
        status=row.status,
        group_permission=Permission(row.group_permission) if row.group_permission else None,
        created_at=row.created_at,
        trashed_at=row.trashed_at,
    )


def _share(row: Any) -> Share:
    return Share(
        id=row.id,
        vfolder_id=row.vfolder_id,
        user=row.user,
        permission=Permission(row.permission),
        state=row.state,
        invited_by=row.invited_by,
        created_at=row.created_at,
    )


class VFolderStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- vfolders --------------------------------------------------------------------------
    def insert(self, vfolder: VFolder, *, max_user_count: int | None = None) -> VFolder:
        """Store a new vfolder (usually with status ``creating``). Refuses a name in use
        (Conflict) and, for user vfolders, one more than ``max_user_count`` (PolicyViolation),
        both checked in the same write transaction as the insert so two processes cannot
        both pass."""
        with write_transaction(self.engine) as conn:
            self._check_name_free(conn, vfolder, vfolder.name)
            if vfolder.type == "user" and max_user_count is not None:
                count = self._count_user(conn, vfolder.owner)
                if count >= max_user_count:
                    raise PolicyViolation(
                        f"{vfolder.owner} has {count} vfolder(s), the most their policy allows "
                        f"(max_vfolder_count = {max_user_count}); the trash counts until it "
                        "is purged: purge or delete vfolders you no longer need, or ask an "
                        "admin for a higher limit."
                    )
            try:
                conn.execute(
                    insert(vfolders).values(
                        id=vfolder.id,
                        name=vfolder.name,
                        type=vfolder.type,
                        owner=vfolder.owner,
                        group_name=vfolder.group,
                        backend=vfolder.backend,
                        quota=vfolder.quota,
                        cloneable=vfolder.cloneable,
                        status=vfolder.status,
                        group_permission=(
                            vfolder.group_permission.value if vfolder.group_permission else None
                        ),
                        created_at=vfolder.created_at,
                        trashed_at=vfolder.trashed_at,
                    )
                )
            except IntegrityError:
                raise self._name_taken(vfolder, vfolder.name, None) from None
        return vfolder

    def get(self, vfolder_id: str) -> VFolder | None:
        with read_transaction(self.engine) as conn:
            row = conn.execute(select(vfolders).where(vfolders.c.id == vfolder_id)).first()
        return _vfolder(row) if row else None

    def visible(
        self,
        username: str,
        groups: Iterable[str],
        *,
        is_admin: bool = False,
        statuses: Iterable[str] = ("ready",),
    ) -> list[tuple[VFolder, Share | None]]:
        """The vfolders ``username`` may see: their own user vfolders, the project vfolders of
        their groups (every project vfolder for an admin), and vfolders shared with them and
        accepted; each with the user's own share row (any state) if there is one."""
        groups = sorted(set(groups))
        accepted = select(vfolder_shares.c.vfolder_id).where(
            vfolder_shares.c.user == username, vfolder_shares.c.state == "accepted"
        )
        project = vfolders.c.type == "project"
        if not is_admin:
            project = project & vfolders.c.group_name.in_(groups)
        query = (
            select(vfolders)
            .where(
                vfolders.c.status.in_(list(statuses)),
                or_(
                    (vfolders.c.type == "user") & (vfolders.c.owner == username),
                    project,
                    vfolders.c.id.in_(accepted),
                ),
            )
            .order_by(vfolders.c.name, vfolders.c.created_at)
        )
        with read_transaction(self.engine) as conn:
            found = [_vfolder(r) for r in conn.execute(query).all()]
            shares = {
                r.vfolder_id: _share(r)
                for r in conn.execute(
                    select(vfolder_shares).where(
                        vfolder_shares.c.user == username,
                        vfolder_shares.c.vfolder_id.in_([v.id for v in found]),
                    )
                ).all()
            }
        return [(v, shares.get(v.id)) for v in found]

    def user_vfolders(self, owner: str, *, statuses: Iterable[str] | None = None) -> list[VFolder]:
        """``owner``'s user vfolders (every status unless ``statuses`` is given)."""
        query = select(vfolders).where(vfolders.c.type == "user", vfolders.c.owner == owner)
        if statuses is not None:
            query = query.where(vfolders.c.status.in_(list(statuses)))
        with read_transaction(self.engine) as conn:
            return [_vfolder(r) for r in conn.execute(query.order_by(vfolders.c.name)).all()]

    def in_status(self, statuses: Iterable[str]) -> list[VFolder]:
        query = select(vfolders).where(vfolders.c.status.in_(list(statuses)))
        with read_transaction(self.engine) as conn:
            return [_vfolder(r) for r in conn.execute(query.order_by(vfolders.c.id)).all()]

    def count_user_vfolders(self, owner: str) -> int:
        with read_transaction(self.engine) as conn:
            return self._count_user(conn, owner)

    def update(self, vfolder_id: str, **values: Any) -> VFolder:
        """Change columns of a vfolder (``name``, ``quota``, ``cloneable``,
        ``group_permission``); a new name must be free (Conflict otherwise)."""
        if "group" in values:
            values["group_name"] = values.pop("group")
        if isinstance(values.get("group_permission"), Permission):
            values["group_permission"] = values["group_permission"].value
        with write_transaction(self.engine) as conn:
            current = self._get(conn, vfolder_id)
            if current is None:
                raise Conflict(f"vfolder {vfolder_id} was purged meanwhile")
            if "name" in values and values["name"] != current.name:
                self._check_name_free(conn, current, values["name"])
            try:
                conn.execute(update(vfolders).where(vfolders.c.id == vfolder_id).values(**values))
            except IntegrityError:
                raise self._name_taken(current, values.get("name", current.name), None) from None
            return self._get(conn, vfolder_id)

    def set_status(
        self, vfolder_id: str, status: str, *, expect: Iterable[str], **values: Any
    ) -> VFolder:
        """Move a vfolder to ``status`` if it is in one of ``expect`` (Conflict otherwise:
        another request changed it first)."""
        expect = tuple(expect)
        with write_transaction(self.engine) as conn:
            current = self._get(conn, vfolder_id)
            if current is None or current.status not in expect:
                now = "purged" if current is None else current.status
                raise Conflict(
                    f"vfolder {vfolder_id} is {now} (another request changed it meanwhile); "
                    "list your vfolders and try again"
                )
            conn.execute(
                update(vfolders).where(vfolders.c.id == vfolder_id).values(status=status, **values)
            )
            return self._get(conn, vfolder_id)

    def remove(self, vfolder_id: str) -> None:
        """Forget a vfolder and its shares (after its storage is gone)."""
        with write_transaction(self.engine) as conn:
            conn.execute(delete(vfolder_shares).where(vfolder_shares.c.vfolder_id == vfolder_id))
            conn.execute(delete(vfolders).where(vfolders.c.id == vfolder_id))

    # -- shares ----------------------------------------------------------------------------
    def share_of(self, vfolder_id: str, user: str) -> Share | None:
        with read_transaction(self.engine) as conn:
            row = conn.execute(
                select(vfolder_shares).where(
                    vfolder_shares.c.vfolder_id == vfolder_id, vfolder_shares.c.user == user
                )
            ).first()
        return _share(row) if row else None

    def get_share(self, share_id: str) -> Share | None:
        with read_transaction(self.engine) as conn:
            row = conn.execute(
                select(vfolder_shares).where(vfolder_shares.c.id == share_id)
            ).first()
        return _share(row) if row else None

    def shares_of(self, vfolder_id: str) -> list[Share]:
        with read_transaction(self.engine) as conn:
            rows = conn.execute(
                select(vfolder_shares)
                .where(vfolder_shares.c.vfolder_id == vfolder_id)
                .order_by(vfolder_shares.c.user)
            ).all()
        return [_share(r) for r in rows]

    def put_share(
        self,
        vfolder_id: str,
        user: str,
        *,
        permission: Permission,
        state: str,
        invited_by: str,
        keep_accepted: bool = False,
    ) -> Share:
        """Create or replace ``user``'s share of a vfolder. With ``keep_accepted`` an accepted
        share keeps its state (only the permission changes)."""
        now = time.time()
        with write_transaction(self.engine) as conn:
            row = conn.execute(
                select(vfolder_shares).where(
                    vfolder_shares.c.vfolder_id == vfolder_id, vfolder_shares.c.user == user
                )
            ).first()
            if row is None:
                share_id = uuid.uuid4().hex
                conn.execute(
                    insert(vfolder_shares).values(
                        id=share_id,
                        vfolder_id=vfolder_id,
                        user=user,
                        permission=permission.value,
                        state=state,
                        invited_by=invited_by,
                        created_at=now,
                    )
                )
            else:
                share_id = row.id
                if keep_accepted and row.state == "accepted":
                    state = "accepted"
                conn.execute(
                    update(vfolder_shares)
                    .where(vfolder_shares.c.id == share_id)
                    .values(permission=permission.value, state=state, invited_by=invited_by)
                )
            return _share(
                conn.execute(select(vfolder_shares).where(vfolder_shares.c.id == share_id)).one()
            )

    def update_share(self, share_id: str, **values: Any) -> Share:
        if isinstance(values.get("permission"), Permission):
            values["permission"] = values["permission"].value
        with write_transaction(self.engine) as conn:
            conn.execute(
                update(vfolder_shares).where(vfolder_shares.c.id == share_id).values(**values)
            )
            return _share(
                conn.execute(select(vfolder_shares).where(vfolder_shares.c.id == share_id)).one()
            )

    def delete_share(self, vfolder_id: str, user: str) -> bool:
        with write_transaction(self.engine) as conn:
            return (
                conn.execute(
                    delete(vfolder_shares).where(
                        vfolder_shares.c.vfolder_id == vfolder_id, vfolder_shares.c.user == user
                    )
                ).rowcount
                > 0
            )

    def shares_received(self, user: str) -> list[tuple[Share, VFolder]]:
        """Shares addressed to ``user`` (any state) of vfolders that are not being purged."""
        return self._shares_with(vfolder_shares.c.user == user)

    def shares_sent(self, owner: str) -> list[tuple[Share, VFolder]]:
        """Shares of ``owner``'s vfolders (user vfolders, and project vfolders they created)."""
        return self._shares_with(vfolders.c.owner == owner)

    def check_name_free(self, vfolder: VFolder, name: str) -> None:
        """Conflict if ``name`` is taken where ``vfolder`` lives (for a rename)."""
        with read_transaction(self.engine) as conn:
            self._check_name_free(conn, vfolder, name)

    # -- helpers ---------------------------------------------------------------------------
    def _shares_with(self, condition) -> list[tuple[Share, VFolder]]:
        query = (
            select(vfolder_shares, vfolders)
            .join(vfolders, vfolders.c.id == vfolder_shares.c.vfolder_id)
            .where(condition, vfolders.c.status.in_(LIVE))
            .order_by(vfolder_shares.c.created_at, vfolder_shares.c.id)
        )
        with read_transaction(self.engine) as conn:
            rows = conn.execute(query).all()
        out = []
        for r in rows:
            m: Mapping[str, Any] = r._mapping
            share = _share(_Row(m, vfolder_shares))
            out.append((share, _vfolder(_Row(m, vfolders))))
        return out

    @staticmethod
    def _get(conn: Connection, vfolder_id: str) -> VFolder | None:
        row = conn.execute(select(vfolders).where(vfolders.c.id == vfolder_id)).first()
        return _vfolder(row) if row else None

    @staticmethod
    def _count_user(conn: Connection, owner: str) -> int:
        return conn.execute(
            select(func.count())
            .select_from(vfolders)
            .where(vfolders.c.type == "user", vfolders.c.owner == owner)
        ).scalar()

    def _check_name_free(self, conn: Connection, vfolder: VFolder, name: str) -> None:
        query = select(vfolders.c.status).where(
            vfolders.c.name == name, vfolders.c.id != vfolder.id
        )
        if vfolder.type == "user":
            query = query.where(vfolders.c.type == "user", vfolders.c.owner == vfolder.owner)
        else:
            query = query.where(
                vfolders.c.type == "project", vfolders.c.group_name == vfolder.group
            )
        row = conn.execute(query).first()
        if row is not None:
            raise self._name_taken(vfolder, name, row.status)

    @staticmethod
    def _name_taken(vfolder: VFolder, name: str, status: str | None) -> Conflict:
        whose = (
            f"group {vfolder.group!r} already has a project vfolder"
            if vfolder.type == "project"
            else f"{vfolder.owner} already has a vfolder"
        )
        if status == "trashed":
            return Conflict(
                f"{whose} named {name!r} in the trash: restore it (restore) or purge it for "
                "good (purge) first, or choose another name"
            )
        if status == "purging":
            return Conflict(f"{whose} named {name!r} being purged: try again in a moment")
        return Conflict(f"{whose} named {name!r}: choose another name")


class _Row:
    """The columns of one table out of a joined row, by their plain names."""

    def __init__(self, mapping: Mapping[Any, Any], table) -> None:
        self._values = {c.name: mapping[c] for c in table.c}

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None
