// The sidebar's pure logic: formatting, ordering, what an admin's views show.

import {
  applyStatusEvent,
  formatBytes,
  formatDuration,
  formatResources,
  gpuBars,
  heldGPUs,
  holderLabels,
  owners,
  quotaLines,
  refusedForDependents,
  sessionAge,
  sortSessions,
  sortVFolders,
  usageBar,
  vfolderNameProblem,
  vfolderUsage,
  visibleSessions
} from '../sidebar/format';
import type { IGPU, IQuota, ISession, IVFolder } from '../sidebar/types';

const GiB = 1024 ** 3;

function session(overrides: Partial<ISession>): ISession {
  return {
    id: 'a'.repeat(32),
    name: 'nb',
    owner: 'ada',
    kind: 'kernel',
    kernel_id: null,
    image: 'img',
    runtime: 'docker',
    request: {
      gpus: 0,
      cpus: null,
      memory: null,
      gpu_profile: null,
      gpu_share: null
    },
    status: 'RUNNING',
    reason: '',
    allocations: [],
    depends_on: [],
    created_at: 1000,
    started_at: 1005,
    ended_at: null,
    ...overrides
  };
}

function gpu(overrides: Partial<IGPU>): IGPU {
  return {
    index: 0,
    uuid: 'GPU-0',
    name: 'A100-80GB',
    memory: 80 * GiB,
    simulated: true,
    mig_mode: false,
    utilization: { gpu: 63, memory_used: 21 * GiB, memory_total: 80 * GiB },
    holders: [],
    usage: [],
    ...overrides
  };
}

describe('formatting', () => {
  it('writes durations to their two largest units', () => {
    expect(formatDuration(0)).toBe('0s');
    expect(formatDuration(42.9)).toBe('42s');
    expect(formatDuration(300)).toBe('5m');
    expect(formatDuration(2 * 3600 + 3 * 60)).toBe('2h 03m');
    expect(formatDuration(3 * 86400 + 4 * 3600 + 59)).toBe('3d 4h');
    expect(formatDuration(-5)).toBe('0s');
  });

  it('measures a session from its start to its end or now', () => {
    expect(sessionAge(session({}), 1065)).toBe(60);
    expect(sessionAge(session({ started_at: null }), 1065)).toBe(65);
    expect(sessionAge(session({ ended_at: 1010 }), 9999)).toBe(5);
  });

  it('writes sizes in binary units', () => {
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(1536 * 1024 ** 2)).toBe('1.5 GiB');
    expect(formatBytes(21 * GiB)).toBe('21 GiB');
    expect(formatBytes(4 * GiB)).toBe('4 GiB');
    expect(formatBytes(null)).toBe('–');
  });

  it('writes what a session asked for', () => {
    const base = session({}).request;
    expect(formatResources(base)).toBe('no GPU');
    expect(
      formatResources({ ...base, gpus: 1, cpus: 2, memory: 8 * GiB })
    ).toBe('1 GPU · 2 CPUs · 8 GiB');
    expect(formatResources({ ...base, gpus: 2 })).toBe('2 GPUs');
    expect(formatResources({ ...base, gpu_profile: '1g.10gb' })).toBe(
      'MIG 1g.10gb'
    );
    expect(formatResources({ ...base, gpu_share: 0.25, cpus: 1 })).toBe(
      '0.25 of a GPU · 1 CPU'
    );
  });

  it('names the GPUs a session holds by index', () => {
    const gpus = [gpu({}), gpu({ index: 1, uuid: 'GPU-1' })];
    const held = [
      {
        gpu_uuid: 'GPU-1',
        device_uuid: 'GPU-1',
        kind: 'gpu' as const,
        fraction: 1
      },
      {
        gpu_uuid: 'GPU-0',
        device_uuid: 'GPU-0',
        kind: 'gpu' as const,
        fraction: 1
      }
    ];
    expect(heldGPUs(held, gpus)).toBe('GPU 0, 1');
    expect(heldGPUs([], gpus)).toBe('');
  });
});

describe('usage bars', () => {
  it('measures against a limit, and has none without one', () => {
    expect(usageBar(5, 10)).toEqual({
      fraction: 0.5,
      level: 'ok',
      percent: '50%'
    });
    expect(usageBar(9, 10).level).toBe('high');
    expect(usageBar(12, 10)).toEqual({
      fraction: 1,
      level: 'full',
      percent: '120%'
    });
    expect(usageBar(3, null).fraction).toBeNull();
    expect(usageBar(null, 10).fraction).toBeNull();
    expect(usageBar(1, 0).fraction).toBeNull();
  });

  it('shows a GPU busy and its memory used', () => {
    const bars = gpuBars(gpu({}));
    expect(bars.compute.percent).toBe('63%');
    expect(bars.memoryText).toBe('21 GiB / 80 GiB');
    const unknown = gpuBars(gpu({ utilization: null }));
    expect(unknown.compute.fraction).toBeNull();
    expect(unknown.memoryText).toBe('80 GiB');
  });

  it('shows a vfolder against its quota', () => {
    const folder = {
      name: 'data',
      quota: 10 * GiB,
      usage: GiB,
      relation: 'own'
    } as IVFolder;
    expect(vfolderUsage(folder).text).toBe('1 GiB / 10 GiB');
    expect(vfolderUsage(folder).bar.percent).toBe('10%');
    expect(vfolderUsage({ ...folder, quota: null }).text).toBe(
      '1 GiB (no quota)'
    );
    expect(vfolderUsage({ ...folder, quota: null, usage: null }).text).toBe(
      'not counted yet (no quota)'
    );
  });

  it('lists the quota against the policy', () => {
    const quota: IQuota = {
      user: 'ada',
      groups: [],
      admin: false,
      policy: {
        max_concurrent_sessions: 4,
        max_pending_sessions: null,
        max_gpus: 2,
        max_cpus: null,
        max_memory: 64 * GiB,
        max_session_lifetime: null,
        idle_timeout: null,
        max_vfolder_count: 10,
        max_vfolder_size: null,
        max_vfolder_total_size: null
      },
      usage: {
        sessions: 1,
        pending_sessions: 0,
        gpus: 2,
        cpus: 3,
        memory: 16 * GiB,
        vfolder_count: 2,
        vfolder_bytes: 2048
      }
    };
    const lines = quotaLines(quota);
    const byLabel = Object.fromEntries(lines.map(l => [l.label, l]));
    expect(byLabel['Sessions'].text).toBe('1 / 4');
    expect(byLabel['GPUs'].bar.level).toBe('full');
    expect(byLabel['CPUs'].text).toBe('3 / no limit');
    expect(byLabel['CPUs'].bar.fraction).toBeNull();
    expect(byLabel['Memory'].text).toBe('16 GiB / 64 GiB');
    expect(byLabel['Storage'].text).toBe('2 KiB / no limit');
  });
});

describe('session lists', () => {
  const running = session({ id: '1', created_at: 10, status: 'RUNNING' });
  const queued = session({ id: '2', created_at: 30, status: 'PENDING' });
  const ended = session({
    id: '3',
    created_at: 40,
    status: 'TERMINATED',
    ended_at: 50
  });
  const newerRunning = session({ id: '4', created_at: 20, status: 'RUNNING' });
  const other = session({ id: '5', owner: 'grace', created_at: 25 });

  it('puts running, then starting and queued sessions first, newest first', () => {
    const sorted = sortSessions([ended, running, queued, newerRunning]);
    expect(sorted.map(s => s.id)).toEqual(['4', '1', '2', '3']);
  });

  it('shows a user only their own sessions, ended ones when asked', () => {
    const all = [running, queued, ended, other];
    const mine = visibleSessions(all, {
      me: 'ada',
      admin: false,
      filter: { kind: 'all' },
      showEnded: false
    });
    expect(mine.map(s => s.id)).toEqual(['1', '2']);
    const withEnded = visibleSessions(all, {
      me: 'ada',
      admin: false,
      filter: { kind: 'all' },
      showEnded: true
    });
    expect(withEnded.map(s => s.id)).toEqual(['1', '2', '3']);
  });

  it("shows an admin everyone's, or one owner's", () => {
    const all = [running, queued, other];
    const options = { me: 'ada', admin: true, showEnded: false };
    expect(
      visibleSessions(all, { ...options, filter: { kind: 'all' } }).map(
        s => s.id
      )
    ).toEqual(['5', '1', '2']);
    expect(
      visibleSessions(all, { ...options, filter: { kind: 'mine' } }).map(
        s => s.id
      )
    ).toEqual(['1', '2']);
    expect(
      visibleSessions(all, {
        ...options,
        filter: { kind: 'owner', owner: 'grace' }
      }).map(s => s.id)
    ).toEqual(['5']);
    expect(owners([other, running, session({ owner: 'bob' })], 'ada')).toEqual([
      'ada',
      'bob',
      'grace'
    ]);
  });

  it('updates a known session from a status event, and says when one is new', () => {
    const event = {
      type: 'status' as const,
      session_id: '1',
      status: 'TERMINATED' as const,
      reason: 'deleted',
      at: 99,
      owner: 'ada',
      name: 'nb',
      kernel_id: null
    };
    const { sessions, unknown } = applyStatusEvent([running, queued], event);
    expect(unknown).toBe(false);
    expect(sessions[0]).toMatchObject({
      status: 'TERMINATED',
      reason: 'deleted',
      ended_at: 99
    });
    expect(sessions[1]).toBe(queued);
    expect(applyStatusEvent([queued], event).unknown).toBe(true);
  });

  it('offers ending the dependents only for a refusal that names them', () => {
    expect(
      refusedForDependents(409, '2 session(s) depend on abc: end them first')
    ).toBe(true);
    expect(
      refusedForDependents(409, 'Restarting a kernel that is still starting')
    ).toBe(false);
    expect(refusedForDependents(404, 'depend')).toBe(false);
  });
});

describe('GPUs and vfolders', () => {
  it('says who holds a GPU', () => {
    const held = gpu({
      holders: [
        {
          session_id: 'a'.repeat(32),
          owner: 'ada',
          name: 'train',
          devices: ['GPU-0']
        },
        {
          session_id: 'b'.repeat(32),
          owner: 'grace',
          name: '',
          devices: ['GPU-0'],
          shares: { 'GPU-0': 0.25 }
        },
        { session_id: null, owner: null, name: '', devices: [] }
      ]
    });
    expect(holderLabels(held, 'ada')).toEqual([
      'you: train',
      `grace: ${'b'.repeat(12)} (0.25 share)`,
      "another user's session"
    ]);
    expect(holderLabels(gpu({}), 'ada')).toEqual([]);
  });

  it('orders vfolders own, group, shared, then by name', () => {
    const folders = [
      { name: 'z', relation: 'shared' },
      { name: 'b', relation: 'own' },
      { name: 'p', relation: 'group' },
      { name: 'a', relation: 'own' }
    ] as IVFolder[];
    expect(sortVFolders(folders).map(f => f.name)).toEqual([
      'a',
      'b',
      'p',
      'z'
    ]);
  });

  it('checks a vfolder name as the server does', () => {
    expect(vfolderNameProblem('data-1.v2')).toBe('');
    expect(vfolderNameProblem('')).toMatch(/name/);
    expect(vfolderNameProblem('.hidden')).toMatch(/starting with/);
    expect(vfolderNameProblem('a..b')).toMatch(/\.\./);
    expect(vfolderNameProblem('x'.repeat(65))).toMatch(/64/);
  });
});
