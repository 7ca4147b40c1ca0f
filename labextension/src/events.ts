// The events websocket (`{base_url}gpu-sessions/api/events`): status changes of the
// caller's sessions, GPU-idle warnings and GPU ticks, as one signal the other modules connect to. It
// reconnects with a growing delay; while it is down the same events come from polling the
// REST API, so a proxy that drops websockets costs freshness, not function.

import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { Token } from '@lumino/coreutils';
import { IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';

import { API_PATH, GPUSessionsAPI, IGPUInfo, ISessionInfo } from './api';

/** A message of the events stream. */
export type ServerEvent =
  | { type: 'hello'; user: string; admin: boolean }
  | {
      type: 'status';
      session_id: string;
      status: string;
      reason: string;
      at: number;
      owner: string;
      name: string;
      kernel_id: string | null;
    }
  | { type: 'gpus'; gpus: IGPUInfo[] }
  | IGPUIdleWarning
  | IGPUIdleWithdrawn;

/** Fields every GPU-idle notice carries (about a kernel holding GPUs). */
interface IGPUIdleNotice {
  session_id: string;
  kernel_id: string | null;
  name: string;
  owner: string;
  /** When it was said (seconds since the epoch). */
  at: number;
  message: string;
}

/** A kernel kept its GPUs under its owner's gpu_idle_threshold for gpu_idle_window: it
 * will be ended at `ends_at` unless it uses its GPU. */
export interface IGPUIdleWarning extends IGPUIdleNotice {
  type: 'gpu-idle-warning';
  threshold: number;
  idle_seconds: number;
  ends_at: number;
}

/** The warning no longer holds (the GPU is used again, a restart, no reading). */
export interface IGPUIdleWithdrawn extends IGPUIdleNotice {
  type: 'gpu-idle-withdrawn';
}

/** The events of the server, live. */
export interface IGPUSessionEvents {
  /** Every event, from the websocket or, while it is down, from polling. */
  readonly received: ISignal<IGPUSessionEvents, ServerEvent>;
  /** Whether the websocket is open (false while polling stands in). */
  readonly connected: boolean;
  readonly connectionChanged: ISignal<IGPUSessionEvents, boolean>;
}

export const IGPUSessionEvents = new Token<IGPUSessionEvents>(
  'jupyter-gpu-sessions:IGPUSessionEvents',
  'The events websocket of jupyter-gpu-sessions: session status changes and GPU ticks.'
);

/** The websocket's URL; the token rides along as JupyterLab's own websockets carry it. */
export function eventsUrl(
  wsUrl: string,
  token: string,
  appendToken: boolean
): string {
  const url = URLExt.join(wsUrl, API_PATH, 'events');
  return token && appendToken
    ? `${url}?token=${encodeURIComponent(token)}`
    : url;
}

/** How long to wait before reconnect attempt `attempt` (0-based): 1 s doubling to 30 s. */
export function reconnectDelay(
  attempt: number,
  baseMs = 1000,
  maxMs = 30000
): number {
  return Math.min(maxMs, baseMs * 2 ** Math.max(0, Math.min(attempt, 16)));
}

/** One message of the websocket, or null when it is not an event this client knows. */
export function parseEvent(data: unknown): ServerEvent | null {
  if (typeof data !== 'string') {
    return null;
  }
  let value: any;
  try {
    value = JSON.parse(data);
  } catch {
    return null;
  }
  if (!value || typeof value !== 'object') {
    return null;
  }
  switch (value.type) {
    case 'hello':
      return typeof value.user === 'string' ? (value as ServerEvent) : null;
    case 'status':
      return typeof value.session_id === 'string' &&
        typeof value.status === 'string'
        ? (value as ServerEvent)
        : null;
    case 'gpus':
      return Array.isArray(value.gpus) ? (value as ServerEvent) : null;
    case 'gpu-idle-warning':
      return typeof value.session_id === 'string' &&
        typeof value.ends_at === 'number'
        ? (value as ServerEvent)
        : null;
    case 'gpu-idle-withdrawn':
      return typeof value.session_id === 'string'
        ? (value as ServerEvent)
        : null;
    default:
      return null;
  }
}

/** What a poll of the active sessions shows changed since the last one, as status events:
 * each session whose status differs from `known` (a new one included). The first poll
 * (`known` null) only records. Returns what to compare the next poll with; the caller
 * reads the final status of a session that left the list. */
export function statusChanges(
  known: Map<string, string> | null,
  sessions: ISessionInfo[],
  now: number
): { known: Map<string, string>; events: ServerEvent[] } {
  const next = new Map<string, string>();
  const events: ServerEvent[] = [];
  for (const s of sessions) {
    next.set(s.id, s.status);
    if (known !== null && known.get(s.id) !== s.status) {
      events.push({
        type: 'status',
        session_id: s.id,
        status: s.status,
        reason: s.reason ?? '',
        at: now,
        owner: s.owner,
        name: s.name,
        kernel_id: s.kernel_id
      });
    }
  }
  return { known: next, events };
}

/** What the stream needs of a websocket; the browser's WebSocket fits. */
interface ISocket {
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: any) => void) | null;
  onerror: ((ev: any) => void) | null;
  close(): void;
}

export interface IEventStreamOptions {
  settings: ServerConnection.ISettings;
  /** Polling interval while the websocket is down (ms). */
  pollMs?: number;
  /** Opens a socket; by default the settings' WebSocket class. */
  openSocket?: (url: string) => ISocket;
  /** What polling reads; by default the REST API. */
  api?: Pick<GPUSessionsAPI, 'sessions' | 'gpus'>;
}

/** The events websocket with reconnect and a polling fallback. */
export class EventStream implements IGPUSessionEvents, IDisposable {
  constructor(options: IEventStreamOptions) {
    this._settings = options.settings;
    this._pollMs = options.pollMs ?? 5000;
    this._openSocket =
      options.openSocket ??
      ((url: string) => new this._settings.WebSocket(url) as ISocket);
    this._api = options.api ?? new GPUSessionsAPI(options.settings);
  }

  get received(): ISignal<IGPUSessionEvents, ServerEvent> {
    return this._received;
  }

  get connectionChanged(): ISignal<IGPUSessionEvents, boolean> {
    return this._connectionChanged;
  }

  get connected(): boolean {
    return this._connected;
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  /** Open the websocket (polling meanwhile, until it is open). */
  start(): void {
    if (this._disposed || this._socket) {
      return;
    }
    this._connect();
    this._startPolling();
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    this._stopPolling();
    if (this._reconnectTimer !== null) {
      clearTimeout(this._reconnectTimer);
      this._reconnectTimer = null;
    }
    const socket = this._socket;
    this._socket = null;
    if (socket) {
      socket.onclose = null;
      socket.close();
    }
    Signal.clearData(this);
  }

  private _connect(): void {
    const url = eventsUrl(
      this._settings.wsUrl,
      this._settings.token,
      this._settings.appendToken
    );
    let socket: ISocket;
    try {
      socket = this._openSocket(url);
    } catch {
      this._scheduleReconnect();
      return;
    }
    this._socket = socket;
    socket.onopen = () => {
      this._attempt = 0;
      this._stopPolling();
      this._setConnected(true);
    };
    socket.onmessage = ev => {
      const event = parseEvent(ev.data);
      if (event) {
        this._received.emit(event);
      }
    };
    socket.onerror = () => {
      // onclose follows and reconnects.
    };
    socket.onclose = () => {
      if (this._socket === socket) {
        this._socket = null;
      }
      this._setConnected(false);
      if (!this._disposed) {
        this._startPolling();
        this._scheduleReconnect();
      }
    };
  }

  private _scheduleReconnect(): void {
    if (this._disposed || this._reconnectTimer !== null) {
      return;
    }
    const delay = reconnectDelay(this._attempt++);
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      if (!this._disposed && !this._socket) {
        this._connect();
      }
    }, delay);
  }

  private _setConnected(value: boolean): void {
    if (this._connected !== value) {
      this._connected = value;
      this._connectionChanged.emit(value);
    }
  }

  private _startPolling(): void {
    if (this._pollTimer !== null || this._disposed) {
      return;
    }
    this._pollTimer = setInterval(() => void this.poll(), this._pollMs);
  }

  private _stopPolling(): void {
    if (this._pollTimer !== null) {
      clearInterval(this._pollTimer);
      this._pollTimer = null;
    }
  }

  /** One poll: status changes of the active sessions, then the GPUs. */
  async poll(): Promise<void> {
    try {
      const page = await this._api.sessions({
        status: 'PENDING,PREPARING,RUNNING,RESTARTING,TERMINATING',
        limit: 500
      });
      const { known, events } = statusChanges(
        this._known,
        page.sessions,
        Date.now() / 1000
      );
      // A session that left the active list ended: its final status is read once.
      if (this._known !== null) {
        for (const id of this._known.keys()) {
          if (!known.has(id)) {
            const ended = await this._endedSession(id);
            if (ended) {
              events.push(
                ...statusChanges(new Map(), [ended], Date.now() / 1000).events
              );
            }
          }
        }
      }
      this._known = known;
      for (const event of events) {
        this._received.emit(event);
      }
      const { gpus } = await this._api.gpus();
      this._received.emit({ type: 'gpus', gpus });
    } catch {
      // The server is unreachable too: the next poll tries again.
    }
  }

  private async _endedSession(id: string): Promise<ISessionInfo | null> {
    const api = this._api as Partial<GPUSessionsAPI>;
    if (!api.session) {
      return null;
    }
    try {
      return await api.session(id);
    } catch {
      return null;
    }
  }

  private _settings: ServerConnection.ISettings;
  private _pollMs: number;
  private _openSocket: (url: string) => ISocket;
  private _api: Pick<GPUSessionsAPI, 'sessions' | 'gpus'>;
  private _socket: ISocket | null = null;
  private _connected = false;
  private _disposed = false;
  private _attempt = 0;
  private _reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  private _pollTimer: ReturnType<typeof setInterval> | null = null;
  private _known: Map<string, string> | null = null;
  private _received = new Signal<IGPUSessionEvents, ServerEvent>(this);
  private _connectionChanged = new Signal<IGPUSessionEvents, boolean>(this);
}

/** Provides the events stream to the other plugins. */
export const eventsPlugin: JupyterFrontEndPlugin<IGPUSessionEvents> = {
  id: 'jupyter-gpu-sessions:events',
  description:
    'The events websocket of jupyter-gpu-sessions, with a polling fallback.',
  autoStart: true,
  provides: IGPUSessionEvents,
  activate: (app: JupyterFrontEnd): IGPUSessionEvents => {
    const stream = new EventStream({
      settings: app.serviceManager.serverSettings
    });
    stream.start();
    return stream;
  }
};
