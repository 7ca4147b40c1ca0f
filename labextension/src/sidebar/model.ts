// What the sidebar shows and does: the caller's sessions (everyone's for admins), the GPUs,
// vfolders and quota, kept current from the events websocket, and the actions on them.

import { ISignal, Signal } from '@lumino/signaling';

import {
  applyStatusEvent,
  isActive,
  OwnerFilter,
  refusedForDependents,
  visibleSessions
} from './format';
import type {
  IGPU,
  IGPUList,
  IQuota,
  ISession,
  ISessionLogs,
  ISessionPage,
  IVFolder,
  Permission,
  ServerEvent
} from './types';

/** The REST routes the sidebar uses (`{base_url}gpu-sessions/api/…`). */
export interface ISidebarClient {
  sessions(query: { status?: string; limit: number }): Promise<ISessionPage>;
  terminate(sessionId: string, recursive: boolean): Promise<void>;
  logs(sessionId: string, tail: number): Promise<ISessionLogs>;
  gpus(): Promise<IGPUList>;
  quota(): Promise<IQuota>;
  vfolders(trash: boolean): Promise<IVFolder[]>;
  createVFolder(name: string, quota: string | null): Promise<IVFolder>;
  shareVFolder(
    name: string,
    user: string,
    permission: Permission
  ): Promise<void>;
  deleteVFolder(name: string): Promise<void>;
  restoreVFolder(name: string): Promise<void>;
}

const ACTIVE_STATUSES = 'PENDING,PREPARING,RUNNING,RESTARTING,TERMINATING';
const PAGE = 200;
// After a status change, what it changes elsewhere (holders, quota) is read once the
// burst of changes a start or an end makes has passed.
const SETTLE_MS = 300;

export class SidebarModel {
  constructor(client: ISidebarClient) {
    this.client = client;
  }

  readonly client: ISidebarClient;
  sessions: ISession[] = [];
  gpus: IGPU[] = [];
  vfolders: IVFolder[] = [];
  trash: IVFolder[] = [];
  quota: IQuota | null = null;
  /** Why the last refresh could not read something ("" when all went well). */
  error = '';
  loaded = false;
  filter: OwnerFilter = { kind: 'all' };
  showEnded = false;
  selectedSession: string | null = null;
  selectedVFolder: string | null = null;

  get me(): string {
    return this.quota?.user ?? '';
  }

  get admin(): boolean {
    return this.quota?.admin ?? false;
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  /** The sessions the current view shows, in order. */
  get shownSessions(): ISession[] {
    return visibleSessions(this.sessions, {
      me: this.me,
      admin: this.admin,
      filter: this.filter,
      showEnded: this.showEnded
    });
  }

  get session(): ISession | null {
    return this.sessions.find(s => s.id === this.selectedSession) ?? null;
  }

  get vfolder(): IVFolder | null {
    return (
      this.vfolders.find(v => v.name === this.selectedVFolder) ??
      this.trash.find(v => v.name === this.selectedVFolder) ??
      null
    );
  }

  /** Read everything again; concurrent calls share one round. */
  refresh(): Promise<void> {
    if (!this._refreshing) {
      this._refreshing = this._refresh().finally(() => {
        this._refreshing = null;
      });
    }
    return this._refreshing;
  }

  setFilter(filter: OwnerFilter): void {
    this.filter = filter;
    this._emit();
  }

  setShowEnded(show: boolean): void {
    this.showEnded = show;
    void this.refresh();
  }

  select(kind: 'session' | 'vfolder', id: string | null): void {
    if (kind === 'session') {
      this.selectedSession = id;
    } else {
      this.selectedVFolder = id;
    }
    this._emit();
  }

  /** A message of the events websocket: status changes update the list at once (and what
   * they change elsewhere shortly after); GPU ticks replace the GPUs. */
  handleEvent(event: ServerEvent): void {
    if (this._disposed) {
      return;
    }
    if (event.type === 'gpus') {
      this.gpus = event.gpus;
      this._emit();
    } else if (event.type === 'status') {
      const { sessions } = applyStatusEvent(this.sessions, event);
      this.sessions = sessions;
      this._emit();
      this._settleSoon();
    } else if (
      event.type === 'hello' &&
      this.quota &&
      this.quota.admin !== event.admin
    ) {
      this._settleSoon();
    }
  }

  async terminate(sessionId: string, recursive: boolean): Promise<void> {
    await this.client.terminate(sessionId, recursive);
    await this.refresh();
  }

  async createVFolder(name: string, quota: string | null): Promise<void> {
    await this.client.createVFolder(name, quota);
    this.selectedVFolder = name;
    await this.refresh();
  }

  async shareVFolder(
    name: string,
    user: string,
    permission: Permission
  ): Promise<void> {
    await this.client.shareVFolder(name, user, permission);
  }

  async deleteVFolder(name: string): Promise<void> {
    await this.client.deleteVFolder(name);
    await this.refresh();
  }

  async restoreVFolder(name: string): Promise<void> {
    await this.client.restoreVFolder(name);
    await this.refresh();
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    if (this._settle !== null) {
      clearTimeout(this._settle);
    }
    Signal.clearData(this);
  }

  private async _refresh(): Promise<void> {
    const problems: string[] = [];
    const read = async <T>(
      what: string,
      request: Promise<T>
    ): Promise<T | null> => {
      try {
        return await request;
      } catch (error) {
        problems.push(`${what}: ${(error as Error).message}`);
        return null;
      }
    };
    const [page, gpus, quota, vfolders, trash] = await Promise.all([
      read(
        'sessions',
        this.client.sessions(
          this.showEnded
            ? { limit: PAGE }
            : { status: ACTIVE_STATUSES, limit: PAGE }
        )
      ),
      read('GPUs', this.client.gpus()),
      read('quota', this.client.quota()),
      read('vfolders', this.client.vfolders(false)),
      read('trash', this.client.vfolders(true))
    ]);
    if (this._disposed) {
      return;
    }
    if (page) {
      this.sessions = page.sessions;
    }
    if (gpus) {
      this.gpus = gpus.gpus;
    }
    if (quota) {
      this.quota = quota;
    }
    if (vfolders) {
      this.vfolders = vfolders;
    }
    if (trash) {
      this.trash = trash;
    }
    if (
      this.selectedSession &&
      !this.sessions.some(s => s.id === this.selectedSession)
    ) {
      this.selectedSession = null;
    }
    this.error = problems.join('\n');
    this.loaded = true;
    this._emit();
  }

  private _settleSoon(): void {
    if (this._settle !== null) {
      clearTimeout(this._settle);
    }
    this._settle = setTimeout(() => {
      this._settle = null;
      void this.refresh();
    }, SETTLE_MS);
  }

  private _emit(): void {
    if (!this._disposed) {
      this._changed.emit();
    }
  }

  private _changed = new Signal<this, void>(this);
  private _disposed = false;
  private _refreshing: Promise<void> | null = null;
  private _settle: ReturnType<typeof setTimeout> | null = null;
}

/** What terminating asks of the person: confirm the end, confirm ending the dependents
 * too, hear why it failed. */
export interface ITerminateUI {
  confirm(session: ISession): Promise<boolean>;
  confirmDependents(message: string): Promise<boolean>;
  fail(error: unknown): Promise<unknown>;
}

/** Terminate a session, asked first; when the server refuses because other sessions depend
 * on it (409), offer to end them too (`recursive=true`). */
export async function terminateSession(
  model: SidebarModel,
  session: ISession | null,
  recursive: boolean,
  ui: ITerminateUI,
  statusOf: (error: unknown) => number | undefined
): Promise<void> {
  if (!session || !canTerminate(session) || !(await ui.confirm(session))) {
    return;
  }
  try {
    await model.terminate(session.id, recursive);
  } catch (error) {
    const message = (error as Error).message;
    if (recursive || !refusedForDependents(statusOf(error), message)) {
      await ui.fail(error);
    } else if (await ui.confirmDependents(message)) {
      await model.terminate(session.id, true).catch(ui.fail);
    }
  }
}

/** Whether a session may still be terminated (it has not ended). */
export function canTerminate(session: ISession | null): boolean {
  return (
    session !== null &&
    isActive(session.status) &&
    session.status !== 'TERMINATING'
  );
}

/** Whether a session has a log to show (it ran, or runs). */
export function hasLogs(session: ISession | null): boolean {
  return (
    session !== null &&
    session.status !== 'PENDING' &&
    session.status !== 'CANCELLED'
  );
}
