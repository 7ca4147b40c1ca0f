// The sidebar's model over a fake client: what a refresh reads, how events update it,
// that a failed read is said and the rest still shown, the actions' requests, and how a
// termination blocked by dependents offers to end them too.

import {
  canTerminate,
  hasLogs,
  ISidebarClient,
  ITerminateUI,
  SidebarModel,
  terminateSession
} from '../sidebar/model';
import type { IGPU, IQuota, ISession, IVFolder } from '../sidebar/types';

function session(
  id: string,
  owner: string,
  status: ISession['status'] = 'RUNNING'
): ISession {
  return {
    id,
    name: `nb-${id}`,
    owner,
    kind: 'kernel',
    kernel_id: `k-${id}`,
    image: 'img',
    runtime: 'docker',
    request: {
      gpus: 1,
      cpus: null,
      memory: null,
      gpu_profile: null,
      gpu_share: null
    },
    status,
    reason: '',
    allocations: [],
    depends_on: [],
    created_at: Number(id),
    started_at: Number(id),
    ended_at: null
  };
}

const quota = (admin: boolean): IQuota => ({
  user: 'ada',
  groups: [],
  admin,
  policy: {
    max_concurrent_sessions: null,
    max_pending_sessions: null,
    max_gpus: null,
    max_cpus: null,
    max_memory: null,
    max_session_lifetime: null,
    idle_timeout: null
  },
  usage: {
    sessions: 1,
    pending_sessions: 0,
    gpus: 1,
    cpus: 0,
    memory: 0,
    vfolder_count: 0,
    vfolder_bytes: 0
  }
});

class FakeClient implements ISidebarClient {
  calls: string[] = [];
  admin = false;
  sessionList: ISession[] = [session('1', 'ada'), session('2', 'grace')];
  failGPUs = false;

  async sessions(query: { status?: string; limit: number }) {
    this.calls.push(`sessions ${query.status ?? 'any'}`);
    return {
      sessions: this.sessionList,
      total: this.sessionList.length,
      limit: 200,
      offset: 0
    };
  }
  async terminate(id: string, recursive: boolean) {
    this.calls.push(`terminate ${id} ${recursive}`);
  }
  async logs(id: string, tail: number) {
    return { session_id: id, live: true, logs: 'x' };
  }
  async gpus() {
    this.calls.push('gpus');
    if (this.failGPUs) {
      throw new Error('NVML went away');
    }
    return {
      inventory: 'SimulatedInventory',
      driver_version: null,
      gpus: [] as IGPU[]
    };
  }
  async quota() {
    return quota(this.admin);
  }
  async vfolders(trash: boolean) {
    this.calls.push(`vfolders ${trash}`);
    return [] as IVFolder[];
  }
  async createVFolder(name: string, q: string | null) {
    this.calls.push(`create ${name} ${q}`);
    return { name } as IVFolder;
  }
  async shareVFolder(name: string, user: string, permission: string) {
    this.calls.push(`share ${name} ${user} ${permission}`);
  }
  async deleteVFolder(name: string) {
    this.calls.push(`delete ${name}`);
  }
  async restoreVFolder(name: string) {
    this.calls.push(`restore ${name}`);
  }
}

describe('SidebarModel', () => {
  it('reads everything, active sessions only unless ended ones are asked for', async () => {
    const client = new FakeClient();
    const model = new SidebarModel(client);
    await model.refresh();
    expect(model.loaded).toBe(true);
    expect(client.calls).toContain(
      'sessions PENDING,PREPARING,RUNNING,RESTARTING,TERMINATING'
    );
    expect(client.calls).toContain('vfolders true');
    expect(model.me).toBe('ada');
    // not an admin: only their own, whatever the server sent
    expect(model.shownSessions.map(s => s.id)).toEqual(['1']);
    client.calls = [];
    model.setShowEnded(true);
    await model.refresh();
    expect(client.calls).toContain('sessions any');
  });

  it("shows an admin every owner's sessions", async () => {
    const client = new FakeClient();
    client.admin = true;
    const model = new SidebarModel(client);
    await model.refresh();
    expect(model.admin).toBe(true);
    expect(model.shownSessions.map(s => s.id)).toEqual(['2', '1']);
    model.setFilter({ kind: 'mine' });
    expect(model.shownSessions.map(s => s.id)).toEqual(['1']);
  });

  it('says what it could not read and shows the rest', async () => {
    const client = new FakeClient();
    client.failGPUs = true;
    const model = new SidebarModel(client);
    await model.refresh();
    expect(model.error).toBe('GPUs: NVML went away');
    expect(model.sessions).toHaveLength(2);
  });

  it('applies a status event at once and reads the rest again shortly after', async () => {
    jest.useFakeTimers();
    try {
      const client = new FakeClient();
      const model = new SidebarModel(client);
      await model.refresh();
      let changes = 0;
      model.changed.connect(() => changes++);
      client.calls = [];
      model.handleEvent({
        type: 'status',
        session_id: '1',
        status: 'TERMINATED',
        reason: 'deleted',
        at: 5,
        owner: 'ada',
        name: 'nb-1',
        kernel_id: 'k-1'
      });
      expect(changes).toBe(1);
      expect(model.shownSessions).toHaveLength(0);
      expect(client.calls).toEqual([]);
      jest.advanceTimersByTime(400);
      expect(client.calls.length).toBeGreaterThan(0);
      model.handleEvent({ type: 'gpus', gpus: [{ index: 3 } as IGPU] });
      expect(model.gpus[0].index).toBe(3);
      model.dispose();
    } finally {
      jest.useRealTimers();
    }
  });

  it('acts through the client and reads again after', async () => {
    const client = new FakeClient();
    const model = new SidebarModel(client);
    await model.terminate('1', true);
    await model.createVFolder('data', '1GiB');
    await model.shareVFolder('data', 'grace', 'ro');
    await model.deleteVFolder('data');
    await model.restoreVFolder('data');
    const actions = client.calls.filter(
      c => !/^(sessions|gpus|vfolders)/.test(c)
    );
    expect(actions).toEqual([
      'terminate 1 true',
      'create data 1GiB',
      'share data grace ro',
      'delete data',
      'restore data'
    ]);
    expect(model.selectedVFolder).toBe('data');
  });

  it('offers terminate and logs only where they apply', () => {
    expect(canTerminate(session('1', 'ada', 'PENDING'))).toBe(true);
    expect(canTerminate(session('1', 'ada', 'TERMINATING'))).toBe(false);
    expect(canTerminate(session('1', 'ada', 'ERROR'))).toBe(false);
    expect(canTerminate(null)).toBe(false);
    expect(hasLogs(session('1', 'ada', 'PENDING'))).toBe(false);
    expect(hasLogs(session('1', 'ada', 'TERMINATED'))).toBe(true);
  });
});

describe('terminateSession', () => {
  class Refusal extends Error {
    constructor(
      message: string,
      readonly status: number
    ) {
      super(message);
    }
  }
  const statusOf = (error: unknown) => (error as Refusal).status;

  function ui(answers: { confirm: boolean; dependents: boolean }) {
    const said: string[] = [];
    const value: ITerminateUI = {
      confirm: async s => {
        said.push(`confirm ${s.id}`);
        return answers.confirm;
      },
      confirmDependents: async message => {
        said.push(`dependents: ${message}`);
        return answers.dependents;
      },
      fail: async error => said.push(`failed: ${(error as Error).message}`)
    };
    return { said, value };
  }

  it('ends nothing unless confirmed', async () => {
    const client = new FakeClient();
    const { said, value } = ui({ confirm: false, dependents: true });
    await terminateSession(
      new SidebarModel(client),
      session('1', 'ada'),
      false,
      value,
      statusOf
    );
    expect(said).toEqual(['confirm 1']);
    expect(client.calls.filter(c => c.startsWith('terminate'))).toEqual([]);
  });

  it('offers ending the dependents when they block the end, and ends them if asked', async () => {
    const client = new FakeClient();
    const refusal =
      '2 session(s) depend on 1: end them first, or send recursive=true';
    client.terminate = async (id: string, recursive: boolean) => {
      client.calls.push(`terminate ${id} ${recursive}`);
      if (!recursive) {
        throw new Refusal(refusal, 409);
      }
    };
    const { said, value } = ui({ confirm: true, dependents: true });
    await terminateSession(
      new SidebarModel(client),
      session('1', 'ada'),
      false,
      value,
      statusOf
    );
    expect(said).toEqual(['confirm 1', `dependents: ${refusal}`]);
    expect(client.calls.filter(c => c.startsWith('terminate'))).toEqual([
      'terminate 1 false',
      'terminate 1 true'
    ]);
  });

  it('says why any other refusal failed', async () => {
    const client = new FakeClient();
    client.terminate = async () => {
      throw new Refusal('No session 1.', 404);
    };
    const { said, value } = ui({ confirm: true, dependents: true });
    await terminateSession(
      new SidebarModel(client),
      session('1', 'ada'),
      false,
      value,
      statusOf
    );
    expect(said).toEqual(['confirm 1', 'failed: No session 1.']);
  });
});
