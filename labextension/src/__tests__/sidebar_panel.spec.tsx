// The sidebar panel in a DOM: rows and buttons reachable and labelled, keys and buttons
// running the sidebar's commands with the row's id.

import './domShim';

import { CommandRegistry } from '@lumino/commands';
import { Widget } from '@lumino/widgets';

import { CommandIDs } from '../sidebar/commandIds';
import { ISidebarClient, SidebarModel } from '../sidebar/model';
import { GPUSessionsPanel } from '../sidebar/panel';
import type { IGPU, IQuota, ISession, IVFolder } from '../sidebar/types';

const session: ISession = {
  id: 'f'.repeat(32),
  name: 'train.ipynb',
  owner: 'ada',
  kind: 'kernel',
  kernel_id: 'k1',
  image: 'img',
  runtime: 'docker',
  request: {
    gpus: 1,
    cpus: 2,
    memory: null,
    gpu_profile: null,
    gpu_share: null
  },
  status: 'RUNNING',
  reason: '',
  allocations: [
    { gpu_uuid: 'GPU-0', device_uuid: 'GPU-0', kind: 'gpu', fraction: 1 }
  ],
  depends_on: [],
  created_at: 0,
  started_at: 0,
  ended_at: null
};

const gpu = {
  index: 0,
  uuid: 'GPU-0',
  name: 'A100-80GB',
  memory: 80 * 1024 ** 3,
  simulated: false,
  mig_mode: false,
  utilization: { gpu: 40, memory_used: 0, memory_total: 80 * 1024 ** 3 },
  holders: [
    {
      session_id: session.id,
      owner: 'ada',
      name: 'train.ipynb',
      devices: ['GPU-0']
    }
  ],
  usage: []
} as IGPU;

const folder = {
  id: 'v1',
  name: 'data',
  type: 'user',
  owner: 'ada',
  group: null,
  quota: 1024 ** 3,
  status: 'ready',
  created_at: 0,
  trashed_at: null,
  permission: 'wd',
  relation: 'own',
  usage: 0
} as IVFolder;

const client: ISidebarClient = {
  sessions: async () => ({
    sessions: [session],
    total: 1,
    limit: 200,
    offset: 0
  }),
  terminate: async () => undefined,
  logs: async id => ({ session_id: id, live: false, logs: '' }),
  gpus: async () => ({ inventory: 'x', driver_version: null, gpus: [gpu] }),
  quota: async () =>
    ({
      user: 'ada',
      groups: [],
      admin: false,
      policy: {
        max_concurrent_sessions: null,
        max_pending_sessions: null,
        max_gpus: 2,
        max_cpus: null,
        max_memory: null,
        max_session_lifetime: null,
        idle_timeout: null
      },
      usage: {
        sessions: 1,
        pending_sessions: 0,
        gpus: 1,
        cpus: 2,
        memory: 0,
        vfolder_count: 1,
        vfolder_bytes: 0
      }
    }) as IQuota,
  vfolders: async trash => (trash ? [] : [folder]),
  createVFolder: async () => folder,
  shareVFolder: async () => undefined,
  deleteVFolder: async () => undefined,
  restoreVFolder: async () => undefined
};

describe('GPUSessionsPanel', () => {
  it('shows labelled, focusable rows whose keys and buttons run the commands', async () => {
    const commands = new CommandRegistry();
    const ran: string[] = [];
    for (const id of Object.values(CommandIDs)) {
      commands.addCommand(id, {
        execute: args => {
          ran.push(`${id} ${JSON.stringify(args)}`);
        }
      });
    }
    const model = new SidebarModel(client);
    const panel = new GPUSessionsPanel(model, commands);
    Widget.attach(panel, document.body);
    await model.refresh();
    panel.update();
    await new Promise(resolve => requestAnimationFrame(resolve));
    await new Promise(resolve => setTimeout(resolve, 0));

    const row = panel.node.querySelector<HTMLElement>(
      `[data-session-id="${session.id}"]`
    )!;
    expect(row).not.toBeNull();
    expect(row.tabIndex).toBe(0);
    expect(row.getAttribute('aria-label')).toBe('Session train.ipynb, running');
    expect(row.textContent).toContain('1 GPU · 2 CPUs · GPU 0');
    const gpuRow = panel.node.querySelector<HTMLElement>(
      '[data-gpu-index="0"]'
    )!;
    expect(gpuRow.getAttribute('aria-label')).toContain(
      'held by you: train.ipynb'
    );
    expect(
      gpuRow
        .querySelector('[role="progressbar"]')!
        .getAttribute('aria-valuenow')
    ).toBe('40');

    row.dispatchEvent(
      new KeyboardEvent('keydown', { key: 'Delete', bubbles: true })
    );
    row.dispatchEvent(
      new KeyboardEvent('keydown', { key: 'Enter', bubbles: true })
    );
    panel.node
      .querySelector<HTMLButtonElement>(
        'button[aria-label="Terminate train.ipynb"]'
      )!
      .click();
    panel.node
      .querySelector<HTMLButtonElement>(
        'button[aria-label="Delete vfolder data"]'
      )!
      .click();
    panel.node
      .querySelector<HTMLButtonElement>('button[aria-label="Create vfolder"]')!
      .click();
    await new Promise(resolve => setTimeout(resolve, 0));
    const id = JSON.stringify({ id: session.id });
    expect(ran).toEqual([
      `${CommandIDs.terminate} ${id}`,
      `${CommandIDs.showLogs} ${id}`,
      `${CommandIDs.terminate} ${id}`,
      `${CommandIDs.deleteVFolder} ${JSON.stringify({ name: 'data' })}`,
      `${CommandIDs.createVFolder} {}`
    ]);
    panel.dispose();
    model.dispose();
  });
});
