import { ISessionInfo } from '../api';
import {
  describeDevices,
  describeRequest,
  detailRows,
  formatDuration,
  formatGiB,
  IGPUUsage,
  queuePosition,
  shortGPUName,
  statusText,
  timeLeft
} from '../statusFormat';

const GiB = 1024 ** 3;
const NOW = 1_000_000;

function session(extra: Partial<ISessionInfo> = {}): ISessionInfo {
  return {
    id: 'abc123',
    name: 'train',
    owner: 'ada',
    kind: 'interactive',
    kernel_id: 'k1',
    image: 'jupyter-gpu-sessions/kernel:1',
    runtime: 'docker',
    request: {
      gpus: 2,
      cpus: null,
      memory: null,
      gpu_profile: null,
      gpu_share: null
    },
    status: 'RUNNING',
    reason: '',
    allocations: [
      { gpu_uuid: 'GPU-0', device_uuid: 'GPU-0', kind: 'gpu', fraction: null },
      { gpu_uuid: 'GPU-1', device_uuid: 'GPU-1', kind: 'gpu', fraction: null }
    ],
    scheduler: {},
    created_at: NOW - 600,
    started_at: NOW - 500,
    ended_at: null,
    ...extra
  };
}

function device(
  index: number,
  name: string,
  used: number,
  total: number | null = 80 * GiB
) {
  return {
    uuid: `GPU-${index}`,
    index,
    name,
    kind: 'gpu',
    memory_used: used,
    memory_total: total,
    utilization: 63
  };
}

const usage: IGPUUsage = {
  memory_used: 21 * GiB,
  utilization: 63,
  devices: [
    device(0, 'NVIDIA A100-80GB', 15 * GiB, 40 * GiB),
    device(1, 'NVIDIA A100-80GB', 6 * GiB, 40 * GiB)
  ]
};

describe('small formats', () => {
  it('formats GiB with one decimal below ten', () => {
    expect(formatGiB(21 * GiB)).toBe('21');
    expect(formatGiB(7.54 * GiB)).toBe('7.5');
    expect(formatGiB(0)).toBe('0');
  });

  it('formats durations', () => {
    expect(
      [-3, 42, 60, 720, 3600, 12000, 86400, 93600].map(formatDuration)
    ).toEqual(['0s', '42s', '1m', '12m', '1h', '3h 20m', '1d', '1d 2h']);
  });

  it('drops the vendor from GPU names', () => {
    expect(shortGPUName('NVIDIA A100-SXM4-80GB')).toBe('A100-SXM4-80GB');
    expect(shortGPUName('')).toBe('GPU');
  });

  it('describes what a session asks for', () => {
    const r = session().request;
    expect(describeRequest({ ...r, gpus: 2 })).toBe('2 GPUs');
    expect(describeRequest({ ...r, gpus: 1 })).toBe('1 GPU');
    expect(describeRequest({ ...r, gpus: 0 })).toBe('a container');
    expect(describeRequest({ ...r, gpu_profile: '1g.10gb' })).toBe(
      'a 1g.10gb MIG instance'
    );
    expect(describeRequest({ ...r, gpus: null, gpu_share: 0.25 })).toBe(
      '0.25 of a GPU'
    );
  });
});

describe('queued', () => {
  it('says its place and what it waits for', () => {
    const queued = session({
      status: 'PENDING',
      allocations: [],
      started_at: null,
      scheduler: { position: 2 },
      queue_message: 'Queued: #2 in the queue, waiting for 2 GPUs: 2 GPUs busy'
    });
    const shown = statusText(queued, null, null, null, NOW);
    expect(shown.text).toBe('queued #2 · waiting for 2 GPUs');
    expect(shown.kind).toBe('queued');
    expect(shown.title).toContain('#2 in the queue');
  });

  it('reads the place from the queue message when the store has none', () => {
    const queued = session({
      status: 'PENDING',
      queue_message: 'Queued: #3 in the queue, waiting for 2 GPUs'
    });
    expect(queuePosition(queued)).toBe(3);
    expect(statusText(queued, null, null, null, NOW).text).toBe(
      'queued #3 · waiting for 2 GPUs'
    );
  });

  it('without a known place, and held by dependencies only', () => {
    const unknown = session({
      status: 'PENDING',
      queue_message: 'Queued: in the queue, …'
    });
    expect(statusText(unknown, null, null, null, NOW).text).toBe(
      'queued · waiting for 2 GPUs'
    );
    const held = session({
      status: 'PENDING',
      scheduler: {
        position: 1,
        failed: [{ check: 'dependencies', message: 'prep' }]
      }
    });
    expect(statusText(held, null, null, null, NOW).text).toBe(
      'queued #1 · waiting for its dependencies'
    );
  });
});

describe('running', () => {
  it("names the GPUs, their utilization and this kernel's own GPU memory", () => {
    const shown = statusText(session(), usage, null, null, NOW);
    expect(shown.text).toBe('2× A100-80GB · 63% · 21/80 GiB');
    expect(shown.kind).toBe('running');
  });

  it('one GPU, a MIG instance, a share and mixed models', () => {
    const one = session({ allocations: [session().allocations[0]] });
    expect(
      statusText(
        one,
        {
          ...usage,
          memory_used: 2 * GiB,
          devices: [device(0, 'A100-80GB', 2 * GiB)]
        },
        null,
        null,
        NOW
      ).text
    ).toBe('A100-80GB · 63% · 2/80 GiB');
    const mig: IGPUUsage = {
      memory_used: 1 * GiB,
      utilization: null,
      devices: [
        {
          ...device(0, 'A100-80GB MIG 1g.10gb', 1 * GiB, 10 * GiB),
          kind: 'mig'
        }
      ]
    };
    expect(statusText(one, mig, null, null, NOW).text).toBe(
      'A100-80GB MIG 1g.10gb · 1/10 GiB'
    );
    const share = session({
      request: { ...session().request, gpus: null, gpu_share: 0.25 },
      allocations: [
        {
          gpu_uuid: 'GPU-0',
          device_uuid: 'GPU-0',
          kind: 'share',
          fraction: 0.25
        }
      ]
    });
    expect(
      describeDevices(share, { ...usage, devices: [device(0, 'A100-80GB', 0)] })
    ).toBe('0.25× A100-80GB');
    expect(
      describeDevices(session(), {
        ...usage,
        devices: [device(0, 'A100-80GB', 0), device(1, 'V100', 0)]
      })
    ).toBe('A100-80GB + V100');
  });

  it('names the GPUs from the inventory when their use is not known yet', () => {
    const names = { 'GPU-0': 'NVIDIA A100-80GB', 'GPU-1': 'NVIDIA A100-80GB' };
    expect(statusText(session(), null, null, null, NOW, names).text).toBe(
      '2× A100-80GB'
    );
    expect(statusText(session(), null, null, null, NOW).text).toBe('2× GPU');
  });

  it('a container without GPU', () => {
    const cpu = session({
      request: { ...session().request, gpus: 0 },
      allocations: []
    });
    const shown = statusText(
      cpu,
      { memory_used: 0, utilization: null, devices: [] },
      null,
      null,
      NOW
    );
    expect(shown.text).toBe('container · no GPU');
    expect(
      statusText({ ...cpu, runtime: 'local' }, null, null, null, NOW).text
    ).toBe('local · no GPU');
  });

  it('adds the time left before the lifetime ends', () => {
    const limits = { idle_timeout: null, max_session_lifetime: 3600 };
    const shown = statusText(session(), usage, limits, null, NOW);
    expect(shown.text).toBe('2× A100-80GB · 63% · 21/80 GiB · 51m left');
    expect(shown.title).toContain('max_session_lifetime');
  });

  it('adds the idle time left, counted from the last activity, unless busy', () => {
    const limits = { idle_timeout: 900, max_session_lifetime: 86400 };
    const last = new Date((NOW - 300) * 1000).toISOString();
    const idle = { last_activity: last, execution_state: 'idle' };
    const shown = statusText(session(), usage, limits, idle, NOW);
    expect(shown.text).toBe('2× A100-80GB · 63% · 21/80 GiB · 10m left');
    expect(shown.title).toContain('idle_timeout');
    const busy = { last_activity: last, execution_state: 'busy' };
    expect(timeLeft(session(), limits, busy, NOW)).toEqual({
      seconds: 86400 - 500,
      by: 'lifetime'
    });
    expect(
      timeLeft(
        session(),
        { idle_timeout: null, max_session_lifetime: null },
        idle,
        NOW
      )
    ).toBeNull();
    expect(
      timeLeft(session({ status: 'PENDING' }), limits, idle, NOW)
    ).toBeNull();
  });
});

describe('other statuses', () => {
  it('starting, restarting, error and ended', () => {
    expect(
      statusText(session({ status: 'PREPARING' }), null, null, null, NOW).text
    ).toBe('starting · 2× GPU');
    expect(
      statusText(
        session({ status: 'RESTARTING', allocations: [] }),
        null,
        null,
        null,
        NOW
      ).text
    ).toBe('restarting · container · no GPU');
    const failed = statusText(
      session({ status: 'ERROR', reason: 'image missing' }),
      null,
      null,
      null,
      NOW
    );
    expect(failed).toMatchObject({
      text: 'container · error',
      kind: 'error',
      title: 'image missing'
    });
    expect(
      statusText(session({ status: 'TERMINATED' }), null, null, null, NOW)
    ).toMatchObject({
      text: 'container · terminated',
      kind: 'ended'
    });
  });
});

describe('detailRows', () => {
  it('summarises the session', () => {
    const rows = new Map(
      detailRows(
        session({
          request: { ...session().request, cpus: 4, memory: 16 * GiB }
        }),
        usage,
        { idle_timeout: null, max_session_lifetime: 3600 },
        null,
        NOW
      )
    );
    expect(rows.get('Session')).toBe('train (abc123)');
    expect(rows.get('Asked for')).toBe('2 GPUs');
    expect(rows.get('CPUs')).toBe('4');
    expect(rows.get('Memory')).toBe('16 GiB');
    expect(rows.get('GPU 0')).toBe('A100-80GB (gpu, 63%), 15/40 GiB');
    expect(rows.get('Running for')).toBe('8m');
    expect(rows.get('Lifetime ends in')).toBe('51m');
    expect(rows.get('Kernel')).toBe('k1');
  });

  it('shows the queue message of a queued session', () => {
    const rows = new Map(
      detailRows(
        session({
          status: 'PENDING',
          queue_message: 'Queued: #1 in the queue'
        }),
        null,
        null,
        null,
        NOW
      )
    );
    expect(rows.get('Queue')).toBe('Queued: #1 in the queue');
  });
});
