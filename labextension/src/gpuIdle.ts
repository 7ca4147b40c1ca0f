// GPU-idle warnings as JupyterLab notifications: a kernel about to be ended for leaving its
// GPU idle is announced with its notebook's name and the time left (the kernel also prints
// it in the notebook); the notice goes when the warning is withdrawn, and the end itself
// is said once (see gpuIdleFormat.ts).

import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { Notification } from '@jupyterlab/apputils';

import { IGPUSessionEvents } from './events';
import { GPUIdleNotices, INotifier } from './gpuIdleFormat';

const jupyterLabNotifier: INotifier = {
  warning: message => Notification.warning(message, { autoClose: false }),
  info: message => Notification.info(message, { autoClose: 10000 }),
  dismiss: id => Notification.dismiss(id)
};

/** Shows the caller's GPU-idle warnings as notifications. */
export const gpuIdlePlugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-gpu-sessions:gpu-idle',
  description:
    'Notifications for kernels about to be ended for leaving their GPUs idle.',
  autoStart: true,
  requires: [IGPUSessionEvents],
  activate: (_app: JupyterFrontEnd, events: IGPUSessionEvents): void => {
    const notices = new GPUIdleNotices(jupyterLabNotifier);
    events.received.connect((_, event) => notices.handle(event));
  }
};
