// What the status bar says about the active notebook's kernel session (pure: from the
// session's JSON, its GPU use, the owner's limits and the kernel's last activity).

import { ISessionInfo } from './api';

/** `gpu_usage` of `GET sessions/{id}` (null unless RUNNING). */
export interface IGPUUsage {
  memory_used: number;
  utilization: number | null;
  devices: {
    uuid: string;
    index: number | null;
    name: string;
    kind: string;
    memory_used: number;
    memory_total: number | null;
    utilization: number | null;
  }[];
}

/** What reclaims a kernel: the owner's policy, in seconds (null: no limit). */
export interface ILimits {
  idle_timeout: number | null;
  max_session_lifetime: number | null;
}

/** The kernel as JupyterLab's kernels API knows it. */
export interface IKernelActivity {
  /** ISO time of its last message (jupyter_server's `last_activity`). */
  last_activity: string | null;
  execution_state: string | null;
}

/** GPU names by UUID (from `GET gpus`). */
export type GPUNames = { [uuid: string]: string };

export type StatusKind = 'queued' | 'starting' | 'running' | 'ended' | 'error';

export interface IStatusText {
  text: string;
  /** A longer explanation (the item's tooltip). */
  title: string;
  kind: StatusKind;
}

const GiB = 1024 ** 3;

/** `21` or `7.5`: whole GiB from 10 up, one decimal below. */
export function formatGiB(bytes: number): string {
  const value = bytes / GiB;
  if (value >= 10 || value === 0) {
    return String(Math.round(value));
  }
  return String(Math.round(value * 10) / 10);
}

/** `42s`, `12m`, `3h 20m`, `2d 4h`. */
export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) {
    return `${s}s`;
  }
  const m = Math.floor(s / 60);
  if (m < 60) {
    return `${m}m`;
  }
  const h = Math.floor(m / 60);
  if (h < 24) {
    return m % 60 ? `${h}h ${m % 60}m` : `${h}h`;
  }
  const d = Math.floor(h / 24);
  return h % 24 ? `${d}d ${h % 24}h` : `${d}d`;
}

/** GPU names without the vendor prefix NVML reports (`NVIDIA A100-SXM4-80GB`). */
export function shortGPUName(name: string): string {
  return name.replace(/^NVIDIA\s+/i, '').trim() || 'GPU';
}

/** What a session asks for, as in "waiting for 2 GPUs". */
export function describeRequest(request: ISessionInfo['request']): string {
  if (request.gpu_profile) {
    return `a ${request.gpu_profile} MIG instance`;
  }
  if (request.gpu_share) {
    return `${request.gpu_share} of a GPU`;
  }
  const gpus = request.gpus ?? 0;
  if (gpus === 0) {
    return 'a container';
  }
  return gpus === 1 ? '1 GPU' : `${gpus} GPUs`;
}

/** A queued session's place: the stored scheduler position, else the queue message's. */
export function queuePosition(session: ISessionInfo): number | null {
  const stored = (session.scheduler ?? {})['position'];
  if (typeof stored === 'number' && stored > 0) {
    return stored;
  }
  const match = /#(\d+) in the queue/.exec(session.queue_message ?? '');
  return match ? Number(match[1]) : null;
}

/** Whether only its dependencies hold a queued (batch) session. */
function waitsOnDependencies(session: ISessionInfo): boolean {
  const failed = (session.scheduler ?? {})['failed'];
  return (
    Array.isArray(failed) &&
    failed.length > 0 &&
    failed.every(f => f && typeof f === 'object' && f.check === 'dependencies')
  );
}

/** The devices a running session holds: `2× A100-80GB`, `A100-80GB MIG 1g.10gb`,
 * `0.25× A100-80GB`, `A100-80GB + V100` for mixed models. */
export function describeDevices(
  session: ISessionInfo,
  usage: IGPUUsage | null,
  gpuNames: GPUNames = {}
): string {
  const names = new Map<string, number>();
  const devices = usage?.devices ?? [];
  if (devices.length > 0) {
    for (const d of devices) {
      const name = shortGPUName(d.name);
      names.set(name, (names.get(name) ?? 0) + 1);
    }
  } else {
    // No GPU use read yet: the names of the GPUs it holds (`GET gpus`), by device.
    const seen = new Set<string>();
    for (const a of session.allocations) {
      if (!seen.has(a.device_uuid)) {
        seen.add(a.device_uuid);
        const name = shortGPUName(gpuNames[a.gpu_uuid] ?? '');
        names.set(name, (names.get(name) ?? 0) + 1);
      }
    }
  }
  const share = session.request.gpu_share;
  const parts = [...names.entries()].map(([name, count]) => {
    if (share) {
      return `${share}× ${name}`;
    }
    return count > 1 ? `${count}× ${name}` : name;
  });
  return parts.join(' + ');
}

/** Seconds before the kernel is reclaimed, and by what: its idle timeout (counted from its
 * last activity, not while busy) or its lifetime (counted from its start). Null when
 * neither applies. */
export function timeLeft(
  session: ISessionInfo,
  limits: ILimits | null,
  kernel: IKernelActivity | null,
  now: number
): { seconds: number; by: 'idle' | 'lifetime' } | null {
  if (!limits || session.status !== 'RUNNING') {
    return null;
  }
  const candidates: { seconds: number; by: 'idle' | 'lifetime' }[] = [];
  if (limits.max_session_lifetime && session.started_at) {
    candidates.push({
      seconds: session.started_at + limits.max_session_lifetime - now,
      by: 'lifetime'
    });
  }
  if (
    limits.idle_timeout &&
    kernel &&
    kernel.execution_state !== 'busy' &&
    kernel.last_activity
  ) {
    const last = Date.parse(kernel.last_activity) / 1000;
    if (!Number.isNaN(last)) {
      candidates.push({
        seconds: last + limits.idle_timeout - now,
        by: 'idle'
      });
    }
  }
  if (candidates.length === 0) {
    return null;
  }
  const first = candidates.reduce((a, b) => (b.seconds < a.seconds ? b : a));
  return { seconds: Math.max(0, first.seconds), by: first.by };
}

/** The status bar's text for a kernel's session. */
export function statusText(
  session: ISessionInfo,
  usage: IGPUUsage | null,
  limits: ILimits | null,
  kernel: IKernelActivity | null,
  now: number,
  gpuNames: GPUNames = {}
): IStatusText {
  const where = session.runtime === 'local' ? 'local' : 'container';
  switch (session.status) {
    case 'PENDING': {
      const position = queuePosition(session);
      const place = position ? `queued #${position}` : 'queued';
      const waits = waitsOnDependencies(session)
        ? 'waiting for its dependencies'
        : `waiting for ${describeRequest(session.request)}`;
      return {
        text: `${place} · ${waits}`,
        title: session.queue_message || `${place}, ${waits}`,
        kind: 'queued'
      };
    }
    case 'PREPARING':
    case 'RESTARTING': {
      const verb = session.status === 'PREPARING' ? 'starting' : 'restarting';
      const what = session.allocations.length
        ? describeDevices(session, usage, gpuNames)
        : `${where} · no GPU`;
      return {
        text: `${verb} · ${what}`,
        title: session.reason || `The kernel's ${where} is ${verb}.`,
        kind: 'starting'
      };
    }
    case 'RUNNING': {
      const parts: string[] = [];
      const titles: string[] = [];
      if (session.allocations.length === 0) {
        parts.push(`${where} · no GPU`);
        titles.push(
          `The kernel runs in a ${where === 'local' ? 'local process' : where} without a GPU.`
        );
      } else {
        parts.push(describeDevices(session, usage, gpuNames));
        if (
          usage &&
          usage.utilization !== null &&
          usage.utilization !== undefined
        ) {
          parts.push(`${Math.round(usage.utilization)}%`);
        }
        const total = (usage?.devices ?? []).reduce(
          (sum, d) => (d.memory_total === null ? sum : sum + d.memory_total),
          0
        );
        if (usage && total > 0) {
          parts.push(`${formatGiB(usage.memory_used)}/${formatGiB(total)} GiB`);
        }
        titles.push(
          "The kernel's GPUs, their utilization and the GPU memory this kernel's processes use."
        );
      }
      const left = timeLeft(session, limits, kernel, now);
      if (left) {
        parts.push(`${formatDuration(left.seconds)} left`);
        titles.push(
          left.by === 'idle'
            ? `Shut down after ${formatDuration(limits!.idle_timeout!)} without execution (idle_timeout): ${formatDuration(left.seconds)} left.`
            : `Ended after ${formatDuration(limits!.max_session_lifetime!)} (max_session_lifetime): ${formatDuration(left.seconds)} left.`
        );
      }
      return {
        text: parts.join(' · '),
        title: titles.join(' '),
        kind: 'running'
      };
    }
    case 'ERROR':
      return {
        text: `${where} · error`,
        title: session.reason || 'The session failed.',
        kind: 'error'
      };
    default:
      return {
        text: `${where} · ${session.status.toLowerCase()}`,
        title:
          session.reason || `The session is ${session.status.toLowerCase()}.`,
        kind: 'ended'
      };
  }
}

/** The session's details as label/value rows (the details dialog). */
export function detailRows(
  session: ISessionInfo,
  usage: IGPUUsage | null,
  limits: ILimits | null,
  kernel: IKernelActivity | null,
  now: number
): [string, string][] {
  const rows: [string, string][] = [
    ['Session', session.name ? `${session.name} (${session.id})` : session.id],
    [
      'Status',
      session.reason ? `${session.status}: ${session.reason}` : session.status
    ],
    ['Owner', session.owner],
    ['Image', session.image],
    ['Runtime', session.runtime],
    ['Asked for', describeRequest(session.request)]
  ];
  if (session.request.cpus) {
    rows.push(['CPUs', String(session.request.cpus)]);
  }
  if (session.request.memory) {
    rows.push(['Memory', `${formatGiB(session.request.memory)} GiB`]);
  }
  if (session.status === 'PENDING' && session.queue_message) {
    rows.push(['Queue', session.queue_message]);
  }
  for (const d of usage?.devices ?? []) {
    const load =
      d.utilization === null ? '' : `, ${Math.round(d.utilization)}%`;
    const memory =
      d.memory_total === null
        ? `${formatGiB(d.memory_used)} GiB`
        : `${formatGiB(d.memory_used)}/${formatGiB(d.memory_total)} GiB`;
    rows.push([
      `GPU ${d.index ?? ''}`.trim(),
      `${shortGPUName(d.name)} (${d.kind}${load}), ${memory}`
    ]);
  }
  if (session.kernel_id) {
    rows.push(['Kernel', session.kernel_id]);
  }
  rows.push(['Created', new Date(session.created_at * 1000).toLocaleString()]);
  if (session.started_at) {
    rows.push([
      'Running for',
      formatDuration((session.ended_at ?? now) - session.started_at)
    ]);
  }
  const left = timeLeft(session, limits, kernel, now);
  if (left) {
    rows.push([
      left.by === 'idle' ? 'Idle shutdown in' : 'Lifetime ends in',
      formatDuration(left.seconds)
    ]);
  }
  return rows;
}
