// The sidebar's REST routes, over the extension's API client (src/api.ts).

import type { ServerConnection } from '@jupyterlab/services';

import { APIError, requestAPI } from '../api';
import type { ISidebarClient } from './model';
import type {
  IGPUList,
  IQuota,
  ISessionLogs,
  ISessionPage,
  IVFolder,
  Permission
} from './types';

const json = (method: string, body: unknown): RequestInit => ({
  method,
  body: JSON.stringify(body)
});

/** The sidebar's client for the server `settings` point at (its base URL and token). */
export function sidebarClient(
  settings: ServerConnection.ISettings
): ISidebarClient {
  const id = encodeURIComponent;
  return {
    sessions: query =>
      requestAPI<ISessionPage>(settings, 'sessions', {}, query),
    terminate: (sessionId, recursive) =>
      requestAPI<void>(
        settings,
        `sessions/${id(sessionId)}`,
        { method: 'DELETE' },
        { recursive: recursive ? 'true' : null }
      ),
    logs: (sessionId, tail) =>
      requestAPI<ISessionLogs>(
        settings,
        `sessions/${id(sessionId)}/logs`,
        {},
        { tail }
      ),
    gpus: () => requestAPI<IGPUList>(settings, 'gpus'),
    quota: () => requestAPI<IQuota>(settings, 'quota'),
    vfolders: async trash =>
      (
        await requestAPI<{ vfolders: IVFolder[] }>(
          settings,
          'vfolders',
          {},
          { trash: trash ? 'true' : null }
        )
      ).vfolders,
    createVFolder: (name, quota) =>
      requestAPI<IVFolder>(
        settings,
        'vfolders',
        json('POST', quota ? { name, quota } : { name })
      ),
    shareVFolder: async (
      name: string,
      user: string,
      permission: Permission
    ) => {
      await requestAPI(
        settings,
        `vfolders/${id(name)}/shares`,
        json('POST', { user, permission })
      );
    },
    deleteVFolder: name =>
      requestAPI<void>(settings, `vfolders/${id(name)}`, { method: 'DELETE' }),
    restoreVFolder: async name => {
      await requestAPI(
        settings,
        `vfolders/${id(name)}/restore`,
        json('POST', {})
      );
    }
  };
}

/** The HTTP status of a refused request (undefined for anything else). */
export function errorStatus(error: unknown): number | undefined {
  return error instanceof APIError ? error.status : undefined;
}
