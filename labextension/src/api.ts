// The REST client of the `{base_url}gpu-sessions/api/` routes, over JupyterLab's server
// connection (its token, XSRF cookie and base URL, so a JupyterHub single-user server works).

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** Where the API lives, under the server's base URL. */
export const API_PATH = 'gpu-sessions/api';

/** A query string's values; `null` and `undefined` leave the key out. */
export type Query = {
  [key: string]: string | number | boolean | null | undefined;
};

/** The URL of an API route: `{baseUrl}gpu-sessions/api/{path}?{query}`. */
export function apiUrl(
  baseUrl: string,
  path: string,
  query: Query = {}
): string {
  const url = URLExt.join(
    baseUrl,
    API_PATH,
    ...path.split('/').filter(p => p !== '')
  );
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    if (value !== null && value !== undefined) {
      params.append(key, String(value));
    }
  }
  const search = params.toString();
  return search ? `${url}?${search}` : url;
}

/** A refused or failed request: the server's `{message, reason}` and the HTTP status. */
export class APIError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly reason: string,
    readonly body: unknown = null
  ) {
    super(message);
    this.name = 'APIError';
  }
}

/** The error an answer's status and body stand for. The API answers `{"message", "reason"}`;
 * a proxy in between may answer HTML or nothing, then the status text is the message. */
export function errorFromResponse(
  status: number,
  statusText: string,
  text: string
): APIError {
  let body: unknown = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  const fields =
    body && typeof body === 'object'
      ? (body as { [key: string]: unknown })
      : {};
  const message =
    typeof fields.message === 'string' && fields.message
      ? fields.message
      : statusText || `HTTP ${status}`;
  const reason = typeof fields.reason === 'string' ? fields.reason : '';
  return new APIError(message, status, reason, body);
}

/** A request to the API: JSON in, JSON out (`undefined` for an empty answer, e.g. 204). */
export async function requestAPI<T>(
  settings: ServerConnection.ISettings,
  path: string,
  init: RequestInit = {},
  query: Query = {}
): Promise<T> {
  const url = apiUrl(settings.baseUrl, path, query);
  let response: Response;
  try {
    // Not JupyterLab's default 'no-store': that appends a timestamp as a query parameter,
    // and the API refuses parameters it does not know. Its answers are never cached.
    response = await ServerConnection.makeRequest(
      url,
      { cache: 'no-cache', ...init },
      settings
    );
  } catch (error) {
    throw new APIError(
      `The Jupyter server could not be reached: ${(error as Error).message ?? error}`,
      0,
      'network'
    );
  }
  const text = await response.text();
  if (!response.ok) {
    throw errorFromResponse(response.status, response.statusText, text);
  }
  return (text ? JSON.parse(text) : undefined) as T;
}

/** A session as `GET sessions` and `GET sessions/{id}` answer it. */
export interface ISessionInfo {
  id: string;
  name: string;
  owner: string;
  kind: string;
  kernel_id: string | null;
  image: string;
  runtime: string;
  request: {
    gpus: number | null;
    cpus: number | null;
    memory: number | null;
    gpu_profile: string | null;
    gpu_share: number | null;
    [key: string]: unknown;
  };
  status: string;
  reason: string;
  allocations: {
    gpu_uuid: string;
    device_uuid: string;
    kind: string;
    fraction: number | null;
  }[];
  queue_message?: string;
  scheduler: { [key: string]: unknown };
  created_at: number;
  started_at: number | null;
  ended_at: number | null;
  [key: string]: unknown;
}

/** A page of `GET sessions`. */
export interface ISessionPage {
  sessions: ISessionInfo[];
  total?: number;
  [key: string]: unknown;
}

/** One GPU of `GET gpus`. */
export interface IGPUInfo {
  index: number;
  uuid: string;
  name: string;
  memory: number;
  simulated: boolean;
  utilization: { [key: string]: unknown } | null;
  holders: { session_id: string | null; owner: string | null; name: string }[];
  [key: string]: unknown;
}

/** The typed routes this extension's modules share. */
export class GPUSessionsAPI {
  constructor(readonly settings: ServerConnection.ISettings) {}

  sessions(query: Query = {}): Promise<ISessionPage> {
    return requestAPI<ISessionPage>(this.settings, 'sessions', {}, query);
  }

  session(id: string): Promise<ISessionInfo> {
    return requestAPI<ISessionInfo>(
      this.settings,
      `sessions/${encodeURIComponent(id)}`
    );
  }

  gpus(): Promise<{ gpus: IGPUInfo[] }> {
    return requestAPI<{ gpus: IGPUInfo[] }>(this.settings, 'gpus');
  }

  /** The caller's policy (`policy`) and usage against it. */
  quota(): Promise<{ [key: string]: unknown }> {
    return requestAPI<{ [key: string]: unknown }>(this.settings, 'quota');
  }

  terminate(id: string, recursive = false): Promise<void> {
    return requestAPI<void>(
      this.settings,
      `sessions/${encodeURIComponent(id)}`,
      { method: 'DELETE' },
      { recursive: recursive || null }
    );
  }
}
