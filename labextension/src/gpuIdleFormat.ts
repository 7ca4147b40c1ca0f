// GPU-idle warnings, what the notifications say and when they go: kept apart from the
// plugin (gpuIdle.ts) so it is tested without JupyterLab's widgets.

import { IGPUIdleWarning, ServerEvent } from './events';

/** What a warning says: whose kernel, how long idle, how long until it is ended. */
export function warningText(event: IGPUIdleWarning, now: number): string {
  const name = event.name || `session ${event.session_id.slice(0, 12)}`;
  const left = Math.max(0, Math.round(event.ends_at - now));
  return (
    `${name}: its kernel has used under ${event.threshold}% of its GPU for ` +
    `${Math.round(event.idle_seconds)}s and will be shut down in ${left}s, its GPU ` +
    'given to others, unless it uses the GPU. Save what you need now.'
  );
}

/** Where notices go (JupyterLab's Notification in the plugin). */
export interface INotifier {
  warning(message: string): string;
  info(message: string): string;
  dismiss(id: string): void;
}

/** One notice per warned session, withdrawn or replaced as the events say. */
export class GPUIdleNotices {
  constructor(notifier: INotifier) {
    this._notifier = notifier;
  }

  /** The warned sessions and their notices' ids. */
  get shown(): ReadonlyMap<string, string> {
    return this._shown;
  }

  handle(event: ServerEvent, now: number = Date.now() / 1000): void {
    if (event.type === 'gpu-idle-warning') {
      this._dismiss(event.session_id);
      this._shown.set(
        event.session_id,
        this._notifier.warning(warningText(event, now))
      );
    } else if (event.type === 'gpu-idle-withdrawn') {
      this._dismiss(event.session_id);
    } else if (event.type === 'status' && this._shown.has(event.session_id)) {
      if (['TERMINATED', 'ERROR', 'CANCELLED'].includes(event.status)) {
        this._dismiss(event.session_id);
        if (event.reason.startsWith('gpu-idle:')) {
          const name = event.name || `session ${event.session_id.slice(0, 12)}`;
          this._notifier.info(
            `${name}: its kernel was shut down (${event.reason}).`
          );
        }
      }
    }
  }

  private _dismiss(sessionId: string): void {
    const id = this._shown.get(sessionId);
    if (id !== undefined) {
      this._notifier.dismiss(id);
      this._shown.delete(sessionId);
    }
  }

  private _notifier: INotifier;
  private _shown = new Map<string, string>();
}
