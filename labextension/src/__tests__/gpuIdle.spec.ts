import { parseEvent, ServerEvent } from '../events';
import { GPUIdleNotices, INotifier, warningText } from '../gpuIdleFormat';

const warning = {
  type: 'gpu-idle-warning',
  session_id: 'a'.repeat(32),
  kernel_id: 'k1',
  name: 'train.ipynb',
  owner: 'ada',
  at: 1000,
  message: 'gpu-idle-warning: ...',
  threshold: 5,
  idle_seconds: 1800.4,
  ends_at: 1180
} as const;

class FakeNotifier implements INotifier {
  said: string[] = [];
  dismissed: string[] = [];
  warning(message: string): string {
    this.said.push(`warning: ${message}`);
    return `n${this.said.length}`;
  }
  info(message: string): string {
    this.said.push(`info: ${message}`);
    return `n${this.said.length}`;
  }
  dismiss(id: string): void {
    this.dismissed.push(id);
  }
}

describe('GPU-idle events', () => {
  it('are parsed from the websocket', () => {
    expect(parseEvent(JSON.stringify(warning))).toEqual(warning);
    const withdrawn = { ...warning, type: 'gpu-idle-withdrawn' };
    expect(parseEvent(JSON.stringify(withdrawn))?.type).toBe(
      'gpu-idle-withdrawn'
    );
    expect(
      parseEvent(JSON.stringify({ type: 'gpu-idle-warning', session_id: 's' }))
    ).toBeNull();
  });

  it('say whose kernel, how long idle and the time left', () => {
    const text = warningText(warning, 1060);
    expect(text).toContain('train.ipynb');
    expect(text).toContain('under 5% of its GPU for 1800s');
    expect(text).toContain('shut down in 120s');
  });

  it('show one notice per warning, gone when withdrawn', () => {
    const notifier = new FakeNotifier();
    const notices = new GPUIdleNotices(notifier);
    notices.handle(warning as ServerEvent, 1000);
    expect(notices.shown.get(warning.session_id)).toBe('n1');
    notices.handle({ ...warning, type: 'gpu-idle-withdrawn' } as ServerEvent);
    expect(notifier.dismissed).toEqual(['n1']);
    expect(notices.shown.size).toBe(0);
  });

  it('say the end once and drop the warning', () => {
    const notifier = new FakeNotifier();
    const notices = new GPUIdleNotices(notifier);
    notices.handle(warning as ServerEvent, 1000);
    notices.handle({
      type: 'status',
      session_id: warning.session_id,
      status: 'TERMINATED',
      reason:
        'gpu-idle: GPU utilization under 5% for 1980s; its devices are free again',
      at: 1180,
      owner: 'ada',
      name: 'train.ipynb',
      kernel_id: 'k1'
    });
    expect(notifier.dismissed).toEqual(['n1']);
    expect(notifier.said[1]).toContain(
      'info: train.ipynb: its kernel was shut down'
    );
    notices.handle({
      type: 'status',
      session_id: warning.session_id,
      status: 'TERMINATED',
      reason: 'gpu-idle: again',
      at: 1181,
      owner: 'ada',
      name: 'train.ipynb',
      kernel_id: 'k1'
    });
    expect(notifier.said).toHaveLength(2);
  });
});
