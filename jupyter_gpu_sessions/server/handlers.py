"""The routes of ``{base_url}gpu-sessions/api/``; the OpenAPI document describes each."""

from __future__ import annotations

from . import sessions as s
from . import vfolders as v
from .engine_rpc import EngineRPCHandler
from .events import EventsHandler
from .launcher import LauncherHandler

_NAME = r"([^/]+)"

handlers = [
    ("sessions", s.SessionsHandler),
    (f"sessions/{_NAME}", s.SessionHandler),
    (f"sessions/{_NAME}/logs", s.SessionLogsHandler),
    (f"sessions/{_NAME}/history", s.SessionHistoryHandler),
    (f"sessions/{_NAME}/graph", s.SessionGraphHandler),
    ("gpus", s.GPUsHandler),
    ("quota", s.QuotaHandler),
    ("launcher", LauncherHandler),
    ("policies", s.PoliciesHandler),
    (f"policies/{_NAME}", s.PolicyHandler),
    ("scheduler/health", s.SchedulerHealthHandler),
    ("scheduler/trigger", s.SchedulerTriggerHandler),
    ("admin/clear-history", s.ClearHistoryHandler),
    ("events", EventsHandler),
    ("openapi.json", s.OpenAPIHandler),
    ("vfolders", v.VFoldersHandler),
    ("vfolder-invitations", v.InvitationsHandler),
    (f"vfolder-invitations/{_NAME}/(accept|decline)", v.InvitationHandler),
    (f"vfolders/{_NAME}", v.VFolderHandler),
    (f"vfolders/{_NAME}/(restore|purge|clone)", v.VFolderActionHandler),
    (f"vfolders/{_NAME}/usage", v.VFolderUsageHandler),
    (f"vfolders/{_NAME}/shares", v.SharesHandler),
    (f"vfolders/{_NAME}/shares/{_NAME}", v.ShareHandler),
    (f"vfolders/{_NAME}/files", v.FilesHandler),
    (f"vfolders/{_NAME}/mkdir", v.MkdirHandler),
    (f"vfolders/{_NAME}/download", v.DownloadHandler),
    (f"vfolders/{_NAME}/upload", v.UploadHandler),
]

# Only in the manager service (GPUSessionsExtension.serve_engine): users' servers in remote
# mode call the engine here.
engine_handlers = [(f"engine/{_NAME}", EngineRPCHandler)]
