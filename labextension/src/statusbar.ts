// The status bar item of the active notebook's kernel: queued (where, waiting for what),
// its GPUs with their utilization and this kernel's own GPU memory, a container without
// GPU, and the time left before an idle timeout or a lifetime reclaims it. Clicking it
// opens the session's details (`gpu-sessions:show-session`, which other parts reuse).

import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { Dialog, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { KernelAPI, ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Widget } from '@lumino/widgets';

import { GPUSessionsAPI, ISessionInfo } from './api';
import { IGPUSessionEvents } from './events';
import {
  detailRows,
  GPUNames,
  IGPUUsage,
  IKernelActivity,
  ILimits,
  IStatusText,
  statusText
} from './statusFormat';

export const SHOW_SESSION_COMMAND = 'gpu-sessions:show-session';

const ACTIVE = 'PENDING,PREPARING,RUNNING,RESTARTING,TERMINATING';
const REFRESH_MS = 5000; // GPU use and the time left, while a session runs
const LIMITS_MS = 60000; // the owner's policy changes rarely

/** A session with what its details show. */
interface ISessionView {
  session: ISessionInfo;
  gpuNames: GPUNames;
  usage: IGPUUsage | null;
  limits: ILimits | null;
  kernel: IKernelActivity | null;
}

/** Reads a kernel's session and what the status bar and the details show of it. */
export class SessionReader {
  constructor(private readonly _settings: ServerConnection.ISettings) {
    this._api = new GPUSessionsAPI(_settings);
  }

  /** The active session of kernel `kernelId`, or null (not a GPU session kernel). */
  async sessionOfKernel(kernelId: string): Promise<ISessionInfo | null> {
    const page = await this._api.sessions({ status: ACTIVE, limit: 500 });
    return page.sessions.find(s => s.kernel_id === kernelId) ?? null;
  }

  /** A session in full: its GPU use (RUNNING), the owner's limits, its kernel's activity. */
  async view(sessionId: string): Promise<ISessionView> {
    const full = await this._api.session(sessionId);
    const usage = (full['gpu_usage'] as IGPUUsage | null | undefined) ?? null;
    const [limits, kernel, gpuNames] = await Promise.all([
      this.limits(),
      this.kernel(full.kernel_id),
      usage ? Promise.resolve({}) : this.gpuNames()
    ]);
    return { session: full, usage, limits, kernel, gpuNames };
  }

  private async limits(): Promise<ILimits | null> {
    const now = Date.now();
    if (this._limits && now - this._limitsAt < LIMITS_MS) {
      return this._limits;
    }
    try {
      const quota = await this._api.quota();
      const policy = (quota['policy'] ?? {}) as { [key: string]: unknown };
      this._limits = {
        idle_timeout:
          typeof policy.idle_timeout === 'number' ? policy.idle_timeout : null,
        max_session_lifetime:
          typeof policy.max_session_lifetime === 'number'
            ? policy.max_session_lifetime
            : null
      };
      this._limitsAt = now;
    } catch {
      // Without them the item leaves the time left out.
    }
    return this._limits;
  }

  private async gpuNames(): Promise<GPUNames> {
    const now = Date.now();
    if (now - this._namesAt >= LIMITS_MS) {
      try {
        const { gpus } = await this._api.gpus();
        this._names = Object.fromEntries(gpus.map(g => [g.uuid, g.name]));
        this._namesAt = now;
      } catch {
        // Then the item says "GPU" until the next read.
      }
    }
    return this._names;
  }

  private async kernel(
    kernelId: string | null
  ): Promise<IKernelActivity | null> {
    if (!kernelId) {
      return null;
    }
    try {
      const model = await KernelAPI.getKernelModel(kernelId, this._settings);
      if (!model) {
        return null;
      }
      return {
        last_activity: model.last_activity ?? null,
        execution_state: model.execution_state ?? null
      };
    } catch {
      return null;
    }
  }

  private _api: GPUSessionsAPI;
  private _limits: ILimits | null = null;
  private _limitsAt = 0;
  private _names: GPUNames = {};
  private _namesAt = -Infinity;
}

/** The status bar item. */
export class GPUSessionStatus extends Widget {
  constructor(
    private readonly _reader: SessionReader,
    private readonly _app: JupyterFrontEnd
  ) {
    super();
    this.addClass('jp-gpu-sessions-statusbar');
    this.addClass('jp-StatusBar-TextItem');
    this.node.setAttribute('role', 'button');
    this.node.tabIndex = 0;
    this.node.addEventListener('click', () => this.open());
    this.node.addEventListener('keydown', (event: KeyboardEvent) => {
      if (event.key === 'Enter' || event.key === ' ') {
        event.preventDefault();
        this.open();
      }
    });
  }

  /** The session shown, if any. */
  get sessionId(): string | null {
    return this._view?.session.id ?? null;
  }

  /** Follow another kernel (null: none). */
  setKernel(kernelId: string | null): void {
    if (kernelId === this._kernelId) {
      return;
    }
    this._kernelId = kernelId;
    this._view = null;
    this._render();
    void this.refresh();
  }

  get kernelId(): string | null {
    return this._kernelId;
  }

  /** Read the kernel's session again and show it. */
  async refresh(): Promise<void> {
    const kernelId = this._kernelId;
    const generation = ++this._generation;
    if (!kernelId) {
      return;
    }
    try {
      const session = await this._reader.sessionOfKernel(kernelId);
      const view = session ? await this._reader.view(session.id) : null;
      if (generation === this._generation) {
        this._view = view;
        this._render();
      }
    } catch {
      // A failed read keeps the last state; the next event or tick tries again.
    }
  }

  open(): void {
    if (this._view) {
      void this._app.commands.execute(SHOW_SESSION_COMMAND, {
        sessionId: this._view.session.id
      });
    }
  }

  private _render(): void {
    const view = this._view;
    this.removeClass('jp-mod-queued');
    this.removeClass('jp-mod-error');
    if (!view) {
      this.node.textContent = '';
      this.node.title = '';
      this.setHidden(true);
      return;
    }
    const shown: IStatusText = statusText(
      view.session,
      view.usage,
      view.limits,
      view.kernel,
      Date.now() / 1000,
      view.gpuNames
    );
    this.node.textContent = shown.text;
    this.node.title = `${shown.title}\nClick for the session's details.`;
    if (shown.kind === 'queued') {
      this.addClass('jp-mod-queued');
    } else if (shown.kind === 'error') {
      this.addClass('jp-mod-error');
    }
    this.setHidden(false);
  }

  private _kernelId: string | null = null;
  private _view: ISessionView | null = null;
  private _generation = 0;
}

/** A dialog with a session's details. */
async function showSession(
  reader: SessionReader,
  sessionId: string
): Promise<void> {
  let view: ISessionView;
  try {
    view = await reader.view(sessionId);
  } catch (error) {
    await showErrorMessage('GPU session', error as Error);
    return;
  }
  const rows = detailRows(
    view.session,
    view.usage,
    view.limits,
    view.kernel,
    Date.now() / 1000
  );
  const table = document.createElement('table');
  table.className = 'jp-gpu-sessions-details';
  for (const [label, value] of rows) {
    const tr = table.insertRow();
    const th = document.createElement('th');
    th.scope = 'row';
    th.textContent = label;
    tr.appendChild(th);
    tr.insertCell().textContent = value;
  }
  const body = new Widget({ node: table });
  await showDialog({
    title: `GPU session ${view.session.name || view.session.id}`,
    body,
    buttons: [Dialog.okButton({ label: 'Close' })]
  });
}

export const statusbarPlugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-gpu-sessions:statusbar',
  description:
    "The active notebook's kernel session in the status bar, and its details.",
  autoStart: true,
  requires: [INotebookTracker],
  optional: [IStatusBar, IGPUSessionEvents],
  activate: (
    app: JupyterFrontEnd,
    notebooks: INotebookTracker,
    statusBar: IStatusBar | null,
    events: IGPUSessionEvents | null
  ): void => {
    const reader = new SessionReader(app.serviceManager.serverSettings);
    const item = new GPUSessionStatus(reader, app);

    app.commands.addCommand(SHOW_SESSION_COMMAND, {
      label: args =>
        args.sessionId
          ? 'Show GPU Session Details'
          : "Show This Kernel's GPU Session",
      caption: "A GPU session's status, resources, GPU use and time left",
      isEnabled: args => !!(args.sessionId || item.sessionId),
      execute: args => {
        const id = (args.sessionId as string | undefined) ?? item.sessionId;
        return id ? showSession(reader, id) : undefined;
      }
    });

    if (!statusBar) {
      return;
    }
    statusBar.registerStatusItem('jupyter-gpu-sessions:status', {
      item,
      align: 'left',
      rank: 4,
      isActive: () => item.kernelId !== null && !item.isHidden
    });

    let followed: NotebookPanel | null = null;
    const follow = () => {
      item.setKernel(followed?.sessionContext.session?.kernel?.id ?? null);
    };
    const onKernelStatus = () => {
      // Starting, restarting, dead: the session changes with it.
      void item.refresh();
    };
    const onCurrent = (_: unknown, panel: NotebookPanel | null) => {
      if (followed) {
        followed.sessionContext.kernelChanged.disconnect(follow);
        followed.sessionContext.statusChanged.disconnect(onKernelStatus);
      }
      followed = panel;
      if (panel) {
        panel.sessionContext.kernelChanged.connect(follow);
        panel.sessionContext.statusChanged.connect(onKernelStatus);
      }
      follow();
    };
    notebooks.currentChanged.connect(onCurrent);
    onCurrent(notebooks, notebooks.currentWidget);

    events?.received.connect((_, event) => {
      if (
        event.type === 'status' &&
        event.kernel_id &&
        event.kernel_id === item.kernelId
      ) {
        void item.refresh();
      }
    });
    // GPU use and the time left change without events: read again every few seconds
    // while the tab is visible (status changes come at once from the websocket).
    window.setInterval(() => {
      if (!document.hidden && item.kernelId) {
        void item.refresh();
      }
    }, REFRESH_MS);
  }
};
