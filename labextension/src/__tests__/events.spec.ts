import { ServerConnection } from '@jupyterlab/services';

import { ISessionInfo } from '../api';
import {
  EventStream,
  eventsUrl,
  parseEvent,
  reconnectDelay,
  ServerEvent,
  statusChanges
} from '../events';

function session(
  id: string,
  status: string,
  extra: Partial<ISessionInfo> = {}
): ISessionInfo {
  return {
    id,
    name: `nb-${id}`,
    owner: 'ada',
    kind: 'interactive',
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
    scheduler: {},
    created_at: 0,
    started_at: null,
    ended_at: null,
    ...extra
  };
}

describe('eventsUrl', () => {
  it('is the websocket route under the base URL', () => {
    expect(eventsUrl('wss://hub.example/user/ada/', '', false)).toBe(
      'wss://hub.example/user/ada/gpu-sessions/api/events'
    );
  });

  it('carries the token only when the settings say so', () => {
    expect(eventsUrl('ws://h/', 'a b', true)).toBe(
      'ws://h/gpu-sessions/api/events?token=a%20b'
    );
    expect(eventsUrl('ws://h/', 'abc', false)).toBe(
      'ws://h/gpu-sessions/api/events'
    );
  });
});

describe('reconnectDelay', () => {
  it('doubles from one second up to thirty', () => {
    expect([0, 1, 2, 3, 4, 5, 6, 40].map(a => reconnectDelay(a))).toEqual([
      1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000
    ]);
  });
});

describe('parseEvent', () => {
  it('reads the three kinds of message', () => {
    expect(
      parseEvent('{"type": "hello", "user": "ada", "admin": false}')
    ).toEqual({
      type: 'hello',
      user: 'ada',
      admin: false
    });
    const status = parseEvent(
      JSON.stringify({
        type: 'status',
        session_id: 's1',
        status: 'RUNNING',
        reason: ''
      })
    );
    expect(status?.type).toBe('status');
    expect(parseEvent('{"type": "gpus", "gpus": []}')).toEqual({
      type: 'gpus',
      gpus: []
    });
  });

  it('drops what it does not know', () => {
    expect(parseEvent('not json')).toBeNull();
    expect(parseEvent('"text"')).toBeNull();
    expect(parseEvent('{"type": "other"}')).toBeNull();
    expect(parseEvent('{"type": "status"}')).toBeNull();
    expect(parseEvent(new ArrayBuffer(2))).toBeNull();
  });
});

describe('statusChanges', () => {
  it('only records on the first poll', () => {
    const { known, events } = statusChanges(
      null,
      [session('a', 'RUNNING')],
      10
    );
    expect(events).toEqual([]);
    expect(known.get('a')).toBe('RUNNING');
  });

  it('reports new sessions and changed statuses, not unchanged ones', () => {
    const known = new Map([
      ['a', 'RUNNING'],
      ['b', 'PENDING']
    ]);
    const { events } = statusChanges(
      known,
      [
        session('a', 'RUNNING'),
        session('b', 'PREPARING'),
        session('c', 'PENDING')
      ],
      10
    );
    expect(
      events.map(e => (e.type === 'status' ? [e.session_id, e.status] : null))
    ).toEqual([
      ['b', 'PREPARING'],
      ['c', 'PENDING']
    ]);
    expect(events[0]).toMatchObject({
      owner: 'ada',
      name: 'nb-b',
      kernel_id: 'k-b',
      at: 10
    });
  });
});

class FakeSocket {
  static opened: FakeSocket[] = [];
  constructor(readonly url: string) {
    FakeSocket.opened.push(this);
  }
  onopen: ((ev: any) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: any) => void) | null = null;
  onerror: ((ev: any) => void) | null = null;
  closed = false;
  close(): void {
    this.closed = true;
  }
}

describe('EventStream', () => {
  const settings = {
    wsUrl: 'ws://h/',
    token: 't',
    appendToken: true
  } as ServerConnection.ISettings;

  beforeEach(() => {
    jest.useFakeTimers();
    FakeSocket.opened = [];
  });

  afterEach(() => {
    jest.useRealTimers();
  });

  function stream(api: any = { sessions: jest.fn(), gpus: jest.fn() }) {
    return new EventStream({
      settings,
      pollMs: 1000,
      openSocket: url => new FakeSocket(url),
      api
    });
  }

  it('emits the messages of the websocket', () => {
    const s = stream();
    const seen: ServerEvent[] = [];
    s.received.connect((_, e) => seen.push(e));
    s.start();
    const socket = FakeSocket.opened[0];
    expect(socket.url).toBe('ws://h/gpu-sessions/api/events?token=t');
    socket.onopen!({});
    expect(s.connected).toBe(true);
    socket.onmessage!({
      data: '{"type": "hello", "user": "ada", "admin": true}'
    });
    socket.onmessage!({ data: 'garbage' });
    expect(seen).toEqual([{ type: 'hello', user: 'ada', admin: true }]);
    s.dispose();
    expect(socket.closed).toBe(true);
  });

  it('reconnects with a growing delay after the socket closes', () => {
    const s = stream();
    const changes: boolean[] = [];
    s.connectionChanged.connect((_, c) => changes.push(c));
    s.start();
    FakeSocket.opened[0].onopen!({});
    FakeSocket.opened[0].onclose!({});
    expect(s.connected).toBe(false);
    expect(FakeSocket.opened.length).toBe(1);
    jest.advanceTimersByTime(1000);
    expect(FakeSocket.opened.length).toBe(2);
    FakeSocket.opened[1].onclose!({}); // refused again: the next wait is longer
    jest.advanceTimersByTime(1999);
    expect(FakeSocket.opened.length).toBe(2);
    jest.advanceTimersByTime(1);
    expect(FakeSocket.opened.length).toBe(3);
    expect(changes).toEqual([true, false]);
    s.dispose();
  });

  it('polls the REST API while the websocket is down, and stops once it is up', async () => {
    let statuses = [session('a', 'PENDING')];
    const api = {
      sessions: jest.fn(() => Promise.resolve({ sessions: statuses })),
      gpus: jest.fn(() => Promise.resolve({ gpus: [] })),
      session: jest.fn((id: string) =>
        Promise.resolve(session(id, 'TERMINATED'))
      )
    };
    const s = stream(api);
    const seen: ServerEvent[] = [];
    s.received.connect((_, e) => seen.push(e));
    s.start();
    await s.poll(); // first poll: records, emits GPUs only
    statuses = [session('a', 'RUNNING')];
    await s.poll();
    statuses = [];
    await s.poll(); // 'a' left the active list: its final status is read
    expect(
      seen.filter(e => e.type === 'status').map(e => (e as any).status)
    ).toEqual(['RUNNING', 'TERMINATED']);
    expect(seen.filter(e => e.type === 'gpus').length).toBe(3);
    FakeSocket.opened[0].onopen!({});
    api.sessions.mockClear();
    jest.advanceTimersByTime(5000);
    expect(api.sessions).not.toHaveBeenCalled();
    s.dispose();
  });
});
