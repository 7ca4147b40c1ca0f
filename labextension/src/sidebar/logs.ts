// A session's log in a main-area tab: its last lines, followed while the session runs.

import { MainAreaWidget } from '@jupyterlab/apputils';
import { refreshIcon, ToolbarButton } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import type { ISidebarClient } from './model';

export const LOG_TAIL = 1000;
// How often a live session's log is read again while its tab is visible.
const FOLLOW_MS = 3000;

export class LogView extends Widget {
  constructor(client: ISidebarClient, sessionId: string) {
    super();
    this.client = client;
    this.sessionId = sessionId;
    this.addClass('jp-gpu-sessions-logs');
    this.node.tabIndex = 0;
    this.node.setAttribute('role', 'log');
    this._status = document.createElement('div');
    this._status.className = 'jp-gpu-sessions-logs-status';
    this._pre = document.createElement('pre');
    this.node.append(this._status, this._pre);
  }

  readonly client: ISidebarClient;
  readonly sessionId: string;

  /** Read the log again; keeps following it while it is live and the tab is shown. */
  async load(): Promise<void> {
    this._stop();
    try {
      const answer = await this.client.logs(this.sessionId, LOG_TAIL);
      if (this.isDisposed) {
        return;
      }
      const atEnd =
        this.node.scrollTop + this.node.clientHeight >=
        this.node.scrollHeight - 4;
      this._pre.textContent = answer.logs || '(the log is empty)';
      this._status.textContent = answer.live
        ? `live · last ${LOG_TAIL} lines · read ${new Date().toLocaleTimeString()}`
        : `ended · last ${LOG_TAIL} lines kept`;
      if (atEnd) {
        this.node.scrollTop = this.node.scrollHeight;
      }
      if (answer.live && this.isVisible) {
        this._timer = setTimeout(() => void this.load(), FOLLOW_MS);
      }
    } catch (error) {
      if (!this.isDisposed) {
        this._status.textContent = `Could not read the log: ${(error as Error).message}`;
      }
    }
  }

  protected onAfterShow(): void {
    void this.load();
  }

  protected onAfterHide(): void {
    this._stop();
  }

  dispose(): void {
    this._stop();
    super.dispose();
  }

  private _stop(): void {
    if (this._timer !== null) {
      clearTimeout(this._timer);
      this._timer = null;
    }
  }

  private _status: HTMLElement;
  private _pre: HTMLElement;
  private _timer: ReturnType<typeof setTimeout> | null = null;
}

/** A tab with a session's log, titled with its name. */
export function createLogWidget(
  client: ISidebarClient,
  sessionId: string,
  label: string
): MainAreaWidget<LogView> {
  const content = new LogView(client, sessionId);
  const widget = new MainAreaWidget({ content });
  widget.id = `jp-gpu-sessions-logs-${sessionId}`;
  widget.title.label = `Log: ${label}`;
  widget.title.closable = true;
  widget.toolbar.addItem(
    'refresh',
    new ToolbarButton({
      icon: refreshIcon,
      tooltip: 'Read the log again',
      onClick: () => void content.load()
    })
  );
  return widget;
}
