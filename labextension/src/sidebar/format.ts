// Pure logic of the sidebar: how sessions, GPUs, vfolders and quotas read, and in which
// order; no DOM, no requests (tested with jest).

import type {
  IAllocation,
  IGPU,
  IResourceRequest,
  ISession,
  IQuota,
  IVFolder,
  ServerEvent,
  SessionStatus
} from './types';

const ACTIVE: SessionStatus[] = [
  'RUNNING',
  'RESTARTING',
  'PREPARING',
  'PENDING',
  'TERMINATING'
];

/** A session that has not ended (it may hold or wait for resources). */
export function isActive(status: SessionStatus): boolean {
  return ACTIVE.includes(status);
}

/** "42s", "5m", "2h 03m", "3d 4h": a duration in seconds, to the two largest units. */
export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) {
    return `${s}s`;
  }
  const minutes = Math.floor(s / 60);
  if (minutes < 60) {
    return `${minutes}m`;
  }
  const hours = Math.floor(minutes / 60);
  if (hours < 24) {
    return `${hours}h ${String(minutes % 60).padStart(2, '0')}m`;
  }
  const days = Math.floor(hours / 24);
  return `${days}d ${hours % 24}h`;
}

/** How long a session has existed: since it started (else since it was created), until
 * it ended (else until `now`, Unix seconds). */
export function sessionAge(session: ISession, now: number): number {
  const from = session.started_at ?? session.created_at;
  const to = session.ended_at ?? now;
  return Math.max(0, to - from);
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

/** "512 B", "1.5 GiB", "21 GiB": binary units, one decimal below 10. */
export function formatBytes(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined || !isFinite(bytes)) {
    return '–';
  }
  let value = Math.max(0, bytes);
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  if (unit === 0) {
    return `${value} B`;
  }
  const text = value < 10 ? value.toFixed(1) : Math.round(value).toString();
  return `${text.replace(/\.0$/, '')} ${UNITS[unit]}`;
}

function plural(count: number, word: string): string {
  return `${count} ${word}${count === 1 ? '' : 's'}`;
}

/** What a session asked for: "2 GPUs · 4 CPUs · 16 GiB", "MIG 1g.10gb",
 * "0.25 of a GPU", "no GPU". */
export function formatResources(request: IResourceRequest): string {
  const parts: string[] = [];
  if (request.gpu_profile) {
    parts.push(`MIG ${request.gpu_profile}`);
  } else if (request.gpu_share) {
    parts.push(`${request.gpu_share} of a GPU`);
  } else if (request.gpus > 0) {
    parts.push(plural(request.gpus, 'GPU'));
  } else {
    parts.push('no GPU');
  }
  if (request.cpus !== null && request.cpus !== undefined) {
    parts.push(plural(request.cpus, 'CPU'));
  }
  if (request.memory !== null && request.memory !== undefined) {
    parts.push(formatBytes(request.memory));
  }
  return parts.join(' · ');
}

/** The GPUs (by index) a session holds, e.g. "GPU 0, 1"; "" when it holds none. */
export function heldGPUs(allocations: IAllocation[], gpus: IGPU[]): string {
  const indexes = new Set<number>();
  for (const allocation of allocations) {
    const gpu = gpus.find(g => g.uuid === allocation.gpu_uuid);
    if (gpu) {
      indexes.add(gpu.index);
    }
  }
  if (indexes.size === 0) {
    return '';
  }
  const sorted = [...indexes].sort((a, b) => a - b);
  return `GPU ${sorted.join(', ')}`;
}

/** A usage bar: the used fraction (0..1, clamped) and a level for its colour; `null`
 * fraction when there is no limit to measure against. */
export interface IUsageBar {
  fraction: number | null;
  level: 'ok' | 'high' | 'full';
  percent: string;
}

export function usageBar(
  used: number | null | undefined,
  limit: number | null | undefined
): IUsageBar {
  if (
    used === null ||
    used === undefined ||
    limit === null ||
    limit === undefined ||
    limit <= 0
  ) {
    return { fraction: null, level: 'ok', percent: '' };
  }
  const raw = used / limit;
  const fraction = Math.min(1, Math.max(0, raw));
  const level = raw >= 1 ? 'full' : raw >= 0.8 ? 'high' : 'ok';
  return { fraction, level, percent: `${Math.round(raw * 100)}%` };
}

/** "3 / 10", "3 / no limit"; sizes formatted as bytes. */
export function formatAgainst(
  used: number,
  limit: number | null | undefined,
  bytes = false
): string {
  const show = (n: number) =>
    bytes ? formatBytes(n) : String(Math.round(n * 100) / 100);
  return `${show(used)} / ${limit === null || limit === undefined ? 'no limit' : show(limit)}`;
}

/** The quota lines the sidebar shows, each with its bar. */
export interface IQuotaLine {
  label: string;
  text: string;
  bar: IUsageBar;
}

export function quotaLines(quota: IQuota): IQuotaLine[] {
  const { usage, policy } = quota;
  const line = (
    label: string,
    used: number,
    limit: number | null | undefined,
    bytes = false
  ): IQuotaLine => ({
    label,
    text: formatAgainst(used, limit, bytes),
    bar: usageBar(used, limit)
  });
  return [
    line('Sessions', usage.sessions, policy.max_concurrent_sessions),
    line('Queued', usage.pending_sessions, policy.max_pending_sessions),
    line('GPUs', usage.gpus, policy.max_gpus),
    line('CPUs', usage.cpus, policy.max_cpus),
    line('Memory', usage.memory, policy.max_memory, true),
    line('vfolders', usage.vfolder_count, policy.max_vfolder_count),
    line('Storage', usage.vfolder_bytes, policy.max_vfolder_total_size, true)
  ];
}

const ORDER: Record<SessionStatus, number> = {
  RUNNING: 0,
  RESTARTING: 1,
  PREPARING: 2,
  PENDING: 3,
  TERMINATING: 4,
  ERROR: 5,
  TERMINATED: 6,
  CANCELLED: 7
};

/** Sessions that have not ended first (running, starting, queued), then newest first. */
export function sortSessions(sessions: ISession[]): ISession[] {
  return [...sessions].sort((a, b) => {
    const activeA = isActive(a.status) ? 0 : 1;
    const activeB = isActive(b.status) ? 0 : 1;
    if (activeA !== activeB) {
      return activeA - activeB;
    }
    if (activeA === 0 && ORDER[a.status] !== ORDER[b.status]) {
      return ORDER[a.status] - ORDER[b.status];
    }
    return b.created_at - a.created_at;
  });
}

/** Whose sessions a view shows: the caller's own, or (admins) everyone's or one owner's. */
export type OwnerFilter =
  { kind: 'mine' } | { kind: 'all' } | { kind: 'owner'; owner: string };

/** The sessions a view shows: `owner` filter (only admins may see others': for anyone
 * else every view is their own), ended ones only when asked for. */
export function visibleSessions(
  sessions: ISession[],
  options: {
    me: string;
    admin: boolean;
    filter: OwnerFilter;
    showEnded: boolean;
  }
): ISession[] {
  const { me, admin, filter, showEnded } = options;
  const shown = sessions.filter(session => {
    if (!showEnded && !isActive(session.status)) {
      return false;
    }
    if (!admin || filter.kind === 'mine') {
      return session.owner === me;
    }
    if (filter.kind === 'owner') {
      return session.owner === filter.owner;
    }
    return true;
  });
  return sortSessions(shown);
}

/** The owners among `sessions`, the caller first, then by name (an admin's owner menu). */
export function owners(sessions: ISession[], me: string): string[] {
  const names = new Set(sessions.map(s => s.owner));
  names.delete(me);
  return [me, ...[...names].sort()];
}

/** Who holds a GPU, as the GPU row says it: "you: train", "ada: eval", "another user's
 * session"; "free" when nobody does. */
export function holderLabels(gpu: IGPU, me: string): string[] {
  if (gpu.holders.length === 0) {
    return [];
  }
  return gpu.holders.map(holder => {
    if (holder.session_id === null || holder.owner === null) {
      return "another user's session";
    }
    const who = holder.owner === me ? 'you' : holder.owner;
    const shares = Object.values(holder.shares ?? {});
    const share = shares.length ? ` (${shares.join(', ')} share)` : '';
    return `${who}: ${holder.name || holder.session_id.slice(0, 12)}${share}`;
  });
}

/** A GPU's utilization and memory bars (from its live utilization, else its size). */
export function gpuBars(gpu: IGPU): {
  compute: IUsageBar;
  memory: IUsageBar;
  memoryText: string;
} {
  const u = gpu.utilization;
  const compute = usageBar(u?.gpu ?? null, 100);
  const total = u?.memory_total ?? gpu.memory;
  const used = u?.memory_used ?? null;
  return {
    compute,
    memory: usageBar(used, total),
    memoryText:
      used === null
        ? formatBytes(total)
        : `${formatBytes(used)} / ${formatBytes(total)}`
  };
}

/** A vfolder's usage against its quota: "1.2 GiB / 10 GiB", "1.2 GiB (no quota)". */
export function vfolderUsage(vfolder: IVFolder): {
  text: string;
  bar: IUsageBar;
} {
  const used = vfolder.usage;
  const text =
    vfolder.quota === null
      ? `${used === null ? 'not counted yet' : formatBytes(used)} (no quota)`
      : `${used === null ? '–' : formatBytes(used)} / ${formatBytes(vfolder.quota)}`;
  return { text, bar: usageBar(used, vfolder.quota) };
}

/** vfolders in the order the list shows them: own, then group, then shared; by name. */
export function sortVFolders(vfolders: IVFolder[]): IVFolder[] {
  const rank = { own: 0, group: 1, shared: 2 };
  return [...vfolders].sort(
    (a, b) =>
      rank[a.relation] - rank[b.relation] || a.name.localeCompare(b.name)
  );
}

/** Apply a status event to the sessions known: the updated list, and whether the event
 * names a session the list does not have (then the list must be fetched again). */
export function applyStatusEvent(
  sessions: ISession[],
  event: Extract<ServerEvent, { type: 'status' }>
): { sessions: ISession[]; unknown: boolean } {
  let found = false;
  const updated = sessions.map(session => {
    if (session.id !== event.session_id) {
      return session;
    }
    found = true;
    const ended = !isActive(event.status);
    return {
      ...session,
      status: event.status,
      reason: event.reason,
      ended_at: ended ? (session.ended_at ?? event.at) : session.ended_at
    };
  });
  return { sessions: updated, unknown: !found };
}

/** Whether a refused DELETE sessions/{id} was refused because other sessions depend on
 * it (409 naming "depend"): then ending them too (`recursive=true`) is offered. */
export function refusedForDependents(
  status: number | undefined,
  message: string
): boolean {
  return status === 409 && /depend/i.test(message);
}

/** A vfolder name the server accepts (openapi.yaml's VFolderName); "" if it does, else why not. */
export function vfolderNameProblem(name: string): string {
  if (!name) {
    return 'Give the vfolder a name.';
  }
  if (name.length > 64) {
    return 'A vfolder name has at most 64 characters.';
  }
  if (!/^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$/.test(name)) {
    return 'Use letters, digits, ".", "_" or "-", starting with a letter or digit, without "..".';
  }
  return '';
}
