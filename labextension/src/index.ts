import { JupyterFrontEndPlugin } from '@jupyterlab/application';

import { eventsPlugin } from './events';
import { gpuIdlePlugin } from './gpuIdle';
import launcherPlugin from './launcher';
import { sidebarPlugin } from './sidebar/plugin';
import { statusbarPlugin } from './statusbar';

/**
 * Every plugin of the extension; each feature lives in its own module, listed here.
 */
const plugins: JupyterFrontEndPlugin<any>[] = [
  eventsPlugin,
  gpuIdlePlugin,
  launcherPlugin,
  sidebarPlugin,
  statusbarPlugin
];

export default plugins;
