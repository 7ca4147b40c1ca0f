// The resource dialog's pure logic: what GET launcher says, the prefill, the metadata.

import {
  cardLabel,
  fieldOptions,
  formatBytes,
  freeInTick,
  fromMetadata,
  gpuModes,
  ILauncherSpec,
  mergeMetadata,
  modeOf,
  parseLauncher,
  prefill,
  problems,
  specDefaults,
  summary,
  toMetadata
} from '../choice';

// GET gpu-sessions/api/launcher as the server answers it: 2 whole GPUs on the host, one
// free; the user's policy allows 1 GPU; a share is possible; two vfolders, one shared
// read-only.
function launcherAnswer(): any {
  return {
    user: 'ada',
    free: {
      gpus: 1,
      gpus_total: 2,
      mig: {},
      share_room: 1,
      summary: '1 GPU free'
    },
    vfolders: [
      { name: 'data', permission: 'rw', mount_permissions: ['ro', 'rw'] },
      { name: 'team', permission: 'ro', mount_permissions: ['ro'] }
    ],
    kernelspecs: [
      {
        name: 'python3-gpu',
        display_name: 'Python 3 (1 GPU)',
        runtime: 'docker',
        parameters: {
          type: 'object',
          properties: {
            gpus: { type: 'integer', minimum: 0, maximum: 1, default: 1 },
            gpu_profile: { type: 'string', enum: [''], default: '' },
            gpu_share: {
              type: 'number',
              minimum: 0,
              maximum: 0.99,
              default: 0
            },
            cpus: { type: 'number', minimum: 0.01, maximum: 4, default: 2 },
            memory: {
              type: 'string',
              pattern:
                '^\\s*[0-9]+(\\.[0-9]+)?\\s*([kKmMgGtT][iI]?[bB]?|[bB])?\\s*$',
              default: '8GiB'
            },
            image: {
              type: 'string',
              enum: ['lab/py:1', 'lab/torch:2'],
              default: 'lab/py:1'
            },
            vfolders: {
              type: 'array',
              items: {
                type: 'object',
                properties: {
                  name: { type: 'string', enum: ['data', 'team'] },
                  permission: { type: 'string', enum: ['ro', 'rw'] }
                }
              },
              default: []
            }
          }
        },
        status: { status: 'allowed' },
        choices: {
          gpus: [
            { value: 0, status: 'allowed' },
            {
              value: 1,
              status: 'would-queue',
              position: 2,
              queued_ahead: 1,
              waits_for: 'GPUs to be freed: 0 of 2 GPUs free'
            },
            {
              value: 2,
              status: 'forbidden',
              limit: 'max_gpus 1 (policy default)'
            }
          ],
          gpu_profile: [],
          gpu_share: [
            { value: 0.25, status: 'allowed' },
            { value: 0.5, status: 'allowed' },
            { value: 0.75, status: 'allowed' }
          ],
          cpus: { maximum: 4, limit: 'max_cpus 4 (policy default)' },
          memory: { maximum: 17179869184, limit: 'this host has 16GiB memory' },
          image: [
            { value: 'lab/py:1', status: 'allowed' },
            { value: 'lab/torch:2', status: 'allowed' }
          ]
        }
      },
      {
        name: 'broken',
        display_name: 'Broken',
        error: 'its kernelspec has an invalid setting'
      }
    ]
  };
}

function gpuSpec(): ILauncherSpec {
  return parseLauncher(launcherAnswer()).specs[0];
}

describe('parseLauncher', () => {
  it('reads the free GPUs and every kernelspec, an invalid one with its error', () => {
    const view = parseLauncher(launcherAnswer());
    expect(view.freeGPUs).toBe(1);
    expect(view.specs.map(s => s.name)).toEqual(['python3-gpu', 'broken']);
    expect(view.specs[1].error).toContain('invalid');
  });

  it('says which vfolders may be mounted read-write', () => {
    expect(gpuSpec().vfolders).toEqual([
      { name: 'data', permission: 'rw' },
      { name: 'team', permission: 'ro' }
    ]);
  });

  it('turns continuous bounds into limit text', () => {
    const spec = gpuSpec();
    expect(spec.limits.cpus).toBe('at most 4 (max_cpus 4 (policy default))');
    expect(spec.limits.memory).toBe(
      'at most 16GiB (this host has 16GiB memory)'
    );
  });

  it('knows no free count when the answer has none', () => {
    expect(parseLauncher({ kernelspecs: [] })).toEqual({
      specs: [],
      freeGPUs: null
    });
  });
});

describe('fieldOptions', () => {
  it('shows a forbidden choice disabled with its limit, a busy one with where it queues', () => {
    const options = fieldOptions(gpuSpec(), 'gpus', v => `${v} GPU`)!;
    expect(options.map(o => [o.value, o.state])).toEqual([
      [0, 'ok'],
      [1, 'queue'],
      [2, 'forbidden']
    ]);
    expect(options[2].label).toBe(
      '2 GPU — not allowed: max_gpus 1 (policy default)'
    );
    expect(options[1].label).toBe(
      '1 GPU — busy now, will queue: #2 in the queue (1 ahead), waiting for GPUs to be freed: 0 of 2 GPUs free'
    );
  });

  it('offers shares the server judged, though the schema has no step', () => {
    expect(fieldOptions(gpuSpec(), 'gpu_share')!.map(o => o.value)).toEqual([
      0.25, 0.5, 0.75
    ]);
  });

  it('has no options for a typed field', () => {
    expect(fieldOptions(gpuSpec(), 'memory')).toBeNull();
  });
});

describe('gpuModes and modeOf', () => {
  it('lists the GPU forms the schema has', () => {
    expect(gpuModes(gpuSpec())).toEqual(['gpus', 'gpu_profile', 'gpu_share']);
  });

  it('takes an empty profile and a zero share as "not this form"', () => {
    expect(modeOf({ gpus: 1, gpu_profile: '', gpu_share: 0 })).toBe('gpus');
    expect(modeOf({ gpu_share: 0.5 })).toBe('gpu_share');
    expect(modeOf({ gpu_profile: '1g.10gb' })).toBe('gpu_profile');
  });
});

describe('prefill', () => {
  it("starts from the kernelspec's defaults", () => {
    expect(prefill(gpuSpec())).toEqual({
      resources: { gpus: 1, cpus: 2, memory: '8GiB' },
      image: 'lab/py:1',
      vfolders: []
    });
    expect(specDefaults(gpuSpec()).resources).not.toHaveProperty('gpu_profile');
  });

  it("takes the user's last choice where it is still offered and allowed", () => {
    const last = {
      resources: { gpu_share: 0.5, cpus: 3, memory: '4GiB' },
      image: 'lab/torch:2',
      vfolders: [{ name: 'data', permission: 'ro' as const }]
    };
    expect(prefill(gpuSpec(), last)).toEqual({
      resources: { gpu_share: 0.5, cpus: 3, memory: '4GiB' },
      image: 'lab/torch:2',
      vfolders: [{ name: 'data', permission: 'ro' }]
    });
  });

  it('keeps the default where the last choice is forbidden or gone now', () => {
    const last = {
      resources: { gpus: 2, cpus: 64 },
      image: 'lab/removed:1',
      vfolders: [
        { name: 'gone', permission: 'rw' as const },
        { name: 'team', permission: 'rw' as const }
      ]
    };
    const choice = prefill(gpuSpec(), last);
    expect(choice.resources).toEqual({ gpus: 1, cpus: 2, memory: '8GiB' });
    expect(choice.image).toBe('lab/py:1');
    // a read-only share never comes back read-write
    expect(choice.vfolders).toEqual([{ name: 'team', permission: 'ro' }]);
  });

  it("lets the notebook's own choice win over the last one", () => {
    const last = { resources: { gpus: 0 }, vfolders: [] };
    const notebook = { resources: { gpu_share: 0.25 }, vfolders: [] };
    expect(prefill(gpuSpec(), last, notebook).resources).toEqual({
      gpu_share: 0.25,
      cpus: 2,
      memory: '8GiB'
    });
  });

  it('keeps a busy choice: it queues, it is not forbidden', () => {
    expect(
      prefill(gpuSpec(), { resources: { gpus: 1 }, vfolders: [] }).resources
        .gpus
    ).toBe(1);
  });
});

describe('problems', () => {
  it('names a forbidden value with its limit', () => {
    expect(
      problems(gpuSpec(), { resources: { gpus: 2 }, vfolders: [] })
    ).toEqual(['gpus 2 is not allowed: max_gpus 1 (policy default)']);
  });

  it('names a value out of range or malformed', () => {
    const found = problems(gpuSpec(), {
      resources: { gpus: 0, cpus: 9, memory: 'lots' },
      image: 'other',
      vfolders: []
    });
    expect(found).toEqual([
      'cpus 9 is not offered (at most 4 (max_cpus 4 (policy default)))',
      'memory lots is not offered (at most 16GiB (this host has 16GiB memory))',
      'image other is not allowed'
    ]);
  });

  it('has none for a busy choice', () => {
    expect(problems(gpuSpec(), prefill(gpuSpec()))).toEqual([]);
  });
});

describe('metadata', () => {
  it('round-trips a choice, writing one GPU form only', () => {
    const choice = {
      resources: { gpus: 0, gpu_share: 0.5, cpus: 1, memory: '2GiB' },
      image: 'lab/py:1',
      vfolders: [{ name: 'data', permission: 'ro' as const }]
    };
    const saved = toMetadata(choice);
    expect(saved).toEqual({
      resources: { gpu_share: 0.5, cpus: 1, memory: '2GiB' },
      image: 'lab/py:1',
      vfolders: [{ name: 'data', permission: 'ro' }]
    });
    expect(fromMetadata(JSON.parse(JSON.stringify(saved)))).toEqual(saved);
  });

  it('reads vfolders written as strings', () => {
    expect(fromMetadata({ vfolders: ['data', 'team:ro'] })!.vfolders).toEqual([
      { name: 'data', permission: 'rw' },
      { name: 'team', permission: 'ro' }
    ]);
  });

  it('reads no choice from nothing or junk', () => {
    expect(fromMetadata(undefined)).toBeNull();
    expect(fromMetadata('x')).toBeNull();
    expect(fromMetadata({ resources: { gpus: 'two' } })).toBeNull();
  });

  it('replaces the choice keys, dropping an image the new choice has none of', () => {
    const merged = mergeMetadata(
      { resources: { gpus: 2 }, image: 'old', vfolders: ['x'] },
      { resources: { gpus: 1 }, vfolders: [] }
    );
    expect(merged).toEqual({ resources: { gpus: 1 }, vfolders: [] });
  });
});

describe('text', () => {
  it('labels a card with the GPUs free now', () => {
    expect(cardLabel('Python 3 (1 GPU)', 3)).toBe(
      'Python 3 (1 GPU) · 3 GPUs free'
    );
    expect(cardLabel('Python 3 (1 GPU)', 1)).toBe(
      'Python 3 (1 GPU) · 1 GPU free'
    );
    expect(cardLabel('Python 3 (1 GPU)', null)).toBe('Python 3 (1 GPU)');
  });

  it('counts the whole GPUs a GPU tick shows free', () => {
    const held = { session_id: 's', owner: 'ada', name: 'n', devices: [] };
    expect(
      freeInTick([
        { mig_mode: false, holders: [] },
        { mig_mode: false, holders: [held] },
        { mig_mode: true, holders: [] }
      ])
    ).toBe(1);
  });

  it('summarises a choice', () => {
    expect(
      summary({ resources: { gpus: 1, cpus: 2, memory: '8GiB' }, vfolders: [] })
    ).toBe('1 GPU · 2 CPUs · 8GiB');
    expect(
      summary({ resources: { gpu_profile: '1g.10gb' }, vfolders: [] })
    ).toBe('MIG 1g.10gb');
    expect(formatBytes(17179869184)).toBe('16GiB');
    expect(formatBytes(1536)).toBe('1.5KiB');
  });
});
