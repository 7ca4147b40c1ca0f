// The resource form in a DOM: labelled controls, forbidden options disabled with their
// limit, a busy choice enabled and saying where it queues, the value read back.

import './jsdom_globals';

import { parseLauncher } from '../choice';
import { ResourceForm } from '../form';

function spec() {
  return parseLauncher({
    free: { gpus: 0 },
    vfolders: [
      { name: 'data', permission: 'rw', mount_permissions: ['ro', 'rw'] },
      { name: 'team', permission: 'ro', mount_permissions: ['ro'] }
    ],
    kernelspecs: [
      {
        name: 'python3-gpu',
        display_name: 'Python 3 (1 GPU)',
        parameters: {
          properties: {
            gpus: { type: 'integer', minimum: 0, maximum: 1, default: 1 },
            gpu_profile: { type: 'string', enum: [''], default: '' },
            gpu_share: {
              type: 'number',
              minimum: 0,
              maximum: 0.99,
              default: 0
            },
            cpus: { type: 'number', minimum: 0.01, maximum: 2, default: 2 },
            memory: { type: 'string', default: '8GiB' },
            image: { type: 'string', enum: ['lab/py:1'], default: 'lab/py:1' },
            vfolders: { type: 'array', default: [] }
          }
        },
        choices: {
          gpus: [
            { value: 0, status: 'allowed' },
            {
              value: 1,
              status: 'would-queue',
              position: 1,
              queued_ahead: 0,
              waits_for: 'GPUs to be freed'
            },
            {
              value: 2,
              status: 'forbidden',
              limit: 'max_gpus 1 (policy default)'
            }
          ],
          gpu_share: [{ value: 0.5, status: 'allowed' }],
          cpus: { maximum: 2, limit: 'this host has 2 CPUs' }
        }
      }
    ]
  }).specs[0];
}

function control(form: ResourceForm, label: string): HTMLElement {
  const element = Array.from(form.node.querySelectorAll('label')).find(
    l => l.textContent === label
  );
  return form.node.querySelector(`[id="${element!.htmlFor}"]`) as HTMLElement;
}

describe('ResourceForm', () => {
  it('labels every control and reads the choice back', () => {
    const form = new ResourceForm(spec(), {
      resources: { gpus: 1, cpus: 2, memory: '8GiB' },
      image: 'lab/py:1',
      vfolders: [{ name: 'data', permission: 'ro' }]
    });
    expect((control(form, 'GPUs') as HTMLSelectElement).value).toBe('1');
    expect((control(form, 'CPUs') as HTMLInputElement).value).toBe('2');
    expect((control(form, 'data') as HTMLInputElement).checked).toBe(true);
    expect(form.getValue()).toEqual({
      resources: { gpus: 1, cpus: 2, memory: '8GiB' },
      image: 'lab/py:1',
      vfolders: [{ name: 'data', permission: 'ro' }]
    });
  });

  it('disables what the policy forbids, with the limit, and keeps a busy choice', () => {
    const form = new ResourceForm(spec(), {
      resources: { gpus: 1 },
      vfolders: []
    });
    const gpus = control(form, 'GPUs') as HTMLSelectElement;
    const [none, one, two] = Array.from(gpus.options);
    expect(none.disabled).toBe(false);
    expect(one.disabled).toBe(false);
    expect(one.textContent).toContain('will queue: #1 in the queue (0 ahead)');
    expect(two.disabled).toBe(true);
    expect(two.textContent).toBe(
      '2 GPUs — not allowed: max_gpus 1 (policy default)'
    );
    const status = form.node.querySelector(
      "[data-field='gpus'] .jp-gpu-sessions-option-status"
    )!;
    expect(status.textContent).toContain('Busy now: will queue');
    expect(
      form.node.querySelector("[data-field='cpus']")!.textContent
    ).toContain('at most 2 (this host has 2 CPUs)');
  });

  it('never offers read-write on a vfolder shared read-only', () => {
    const form = new ResourceForm(spec(), { resources: {}, vfolders: [] });
    const permission = form.node.querySelector(
      '[aria-label="Permission for team"]'
    ) as HTMLSelectElement;
    expect(permission.value).toBe('ro');
    expect(
      (permission.querySelector("option[value='rw']") as HTMLOptionElement)
        .disabled
    ).toBe(true);
  });

  it('switches to a share of a GPU', () => {
    const form = new ResourceForm(spec(), {
      resources: { gpus: 0 },
      vfolders: []
    });
    const share = form.node.querySelector(
      "input[value='gpu_share']"
    ) as HTMLInputElement;
    share.checked = true;
    share.dispatchEvent(new Event('change'));
    expect(
      (form.node.querySelector("[data-field='gpus']") as HTMLElement).hidden
    ).toBe(true);
    expect(form.getValue().resources).toEqual({ gpu_share: 0.5 });
  });
});
