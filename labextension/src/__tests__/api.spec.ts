import { ServerConnection } from '@jupyterlab/services';

import { APIError, apiUrl, errorFromResponse, requestAPI } from '../api';

class FakeHeaders {
  private _values = new Map<string, string>();
  append(key: string, value: string): void {
    this._values.set(key.toLowerCase(), value);
  }
  set(key: string, value: string): void {
    this._values.set(key.toLowerCase(), value);
  }
  has(key: string): boolean {
    return this._values.has(key.toLowerCase());
  }
  get(key: string): string | null {
    return this._values.get(key.toLowerCase()) ?? null;
  }
}

class FakeRequest {
  constructor(
    readonly url: string,
    readonly init: RequestInit
  ) {}
  readonly headers = new FakeHeaders();
  get method(): string {
    return this.init.method ?? 'GET';
  }
}

// jsdom has no fetch: the settings carry stand-ins, built by hand (makeSettings reads the
// missing globals).
function settingsWith(
  fetch: (request: FakeRequest) => Promise<Response>
): ServerConnection.ISettings {
  return {
    baseUrl: 'http://hub.example/user/ada/',
    appUrl: '',
    wsUrl: 'ws://hub.example/user/ada/',
    init: { cache: 'no-store', credentials: 'same-origin' },
    token: 'secret',
    appendToken: true,
    fetch: fetch as any,
    Request: FakeRequest as any,
    Headers: FakeHeaders as any,
    WebSocket: class {} as any,
    serializer: { serialize: JSON.stringify, deserialize: JSON.parse } as any
  };
}

function answer(status: number, body: string, statusText = ''): Response {
  return {
    ok: status >= 200 && status < 300,
    status,
    statusText,
    text: () => Promise.resolve(body)
  } as Response;
}

describe('apiUrl', () => {
  it('joins the base URL, the API prefix and the route', () => {
    expect(apiUrl('http://localhost:8888/', 'sessions')).toBe(
      'http://localhost:8888/gpu-sessions/api/sessions'
    );
  });

  it('keeps a JupyterHub base URL', () => {
    expect(apiUrl('https://hub.example/user/ada/', 'sessions/abc/logs')).toBe(
      'https://hub.example/user/ada/gpu-sessions/api/sessions/abc/logs'
    );
  });

  it('adds the query, leaving out null and undefined values', () => {
    expect(
      apiUrl('http://h/', 'sessions', {
        status: 'RUNNING,PENDING',
        limit: 5,
        owner: null,
        offset: undefined,
        recursive: true
      })
    ).toBe(
      'http://h/gpu-sessions/api/sessions?status=RUNNING%2CPENDING&limit=5&recursive=true'
    );
  });
});

describe('errorFromResponse', () => {
  it("carries the server's message and reason", () => {
    const error = errorFromResponse(
      409,
      'Conflict',
      JSON.stringify({ message: 'session abc has ended', reason: 'conflict' })
    );
    expect(error).toBeInstanceOf(APIError);
    expect(error.message).toBe('session abc has ended');
    expect(error.reason).toBe('conflict');
    expect(error.status).toBe(409);
  });

  it('falls back to the status text for a body that is not the API’s JSON', () => {
    const error = errorFromResponse(502, 'Bad Gateway', '<html>proxy</html>');
    expect(error.message).toBe('Bad Gateway');
    expect(error.reason).toBe('');
    expect(errorFromResponse(500, '', '').message).toBe('HTTP 500');
  });
});

describe('requestAPI', () => {
  it('requests the route under the base URL and parses the JSON answer', async () => {
    const seen: FakeRequest[] = [];
    const settings = settingsWith(request => {
      seen.push(request);
      return Promise.resolve(answer(200, JSON.stringify({ sessions: [] })));
    });
    const page = await requestAPI<{ sessions: unknown[] }>(
      settings,
      'sessions',
      {},
      { limit: 1 }
    );
    expect(page).toEqual({ sessions: [] });
    expect(seen[0].method).toBe('GET');
    // No cache-busting timestamp (JupyterLab's default for GET): the API refuses
    // query parameters it does not know.
    expect(seen[0].url).toBe(
      'http://hub.example/user/ada/gpu-sessions/api/sessions?limit=1'
    );
    expect(seen[0].headers.get('Authorization')).toBe('token secret');
  });

  it('answers undefined for an empty body (204)', async () => {
    const settings = settingsWith(() => Promise.resolve(answer(204, '')));
    await expect(
      requestAPI(settings, 'sessions/x', { method: 'DELETE' })
    ).resolves.toBeUndefined();
  });

  it('rejects with an APIError carrying the refusal', async () => {
    const settings = settingsWith(() =>
      Promise.resolve(
        answer(
          404,
          JSON.stringify({ message: 'no session x', reason: 'not-found' })
        )
      )
    );
    await expect(requestAPI(settings, 'sessions/x')).rejects.toMatchObject({
      name: 'APIError',
      status: 404,
      reason: 'not-found',
      message: 'no session x'
    });
  });

  it('says when the server cannot be reached', async () => {
    const settings = settingsWith(() =>
      Promise.reject(new TypeError('Failed to fetch'))
    );
    await expect(requestAPI(settings, 'gpus')).rejects.toMatchObject({
      status: 0,
      reason: 'network'
    });
  });
});
