// The shapes of the REST answers the sidebar reads (server/openapi.yaml names each).

export type SessionStatus =
  | 'PENDING'
  | 'PREPARING'
  | 'RUNNING'
  | 'RESTARTING'
  | 'TERMINATING'
  | 'TERMINATED'
  | 'CANCELLED'
  | 'ERROR';

export interface IResourceRequest {
  gpus: number;
  cpus: number | null;
  memory: number | null;
  shm_size?: number | null;
  pids_limit?: number | null;
  gpu_profile: string | null;
  gpu_share: number | null;
}

export interface IAllocation {
  gpu_uuid: string;
  device_uuid: string;
  kind: 'gpu' | 'mig' | 'share';
  fraction: number;
}

export interface ISession {
  id: string;
  name: string;
  owner: string;
  kind: string;
  kernel_id: string | null;
  image: string;
  runtime: string;
  request: IResourceRequest;
  status: SessionStatus;
  reason: string;
  allocations: IAllocation[];
  depends_on: string[];
  created_at: number;
  started_at: number | null;
  ended_at: number | null;
  queue_message?: string;
}

export interface ISessionPage {
  sessions: ISession[];
  total: number;
  limit: number;
  offset: number;
}

export interface IGPUHolder {
  session_id: string | null;
  owner: string | null;
  name: string;
  devices: string[];
  shares?: Record<string, number>;
}

export interface IGPUUsage {
  session_id: string | null;
  name: string;
  owner: string | null;
  memory_used: number | null;
  utilization: number | null;
}

export interface IGPU {
  index: number;
  uuid: string;
  name: string;
  memory: number;
  simulated: boolean;
  mig_mode: boolean;
  utilization: {
    gpu: number | null;
    memory_used: number | null;
    memory_total: number | null;
  } | null;
  holders: IGPUHolder[];
  usage: IGPUUsage[];
}

export interface IGPUList {
  inventory: string;
  driver_version: string | null;
  gpus: IGPU[];
}

export interface IPolicy {
  max_concurrent_sessions: number | null;
  max_pending_sessions: number | null;
  max_gpus: number | null;
  max_cpus: number | null;
  max_memory: number | null;
  max_session_lifetime: number | null;
  idle_timeout: number | null;
  max_vfolder_count?: number | null;
  max_vfolder_size?: number | null;
  max_vfolder_total_size?: number | null;
}

export interface IQuota {
  user: string;
  groups: string[];
  admin: boolean;
  policy: IPolicy;
  usage: {
    sessions: number;
    pending_sessions: number;
    gpus: number;
    cpus: number;
    memory: number;
    vfolder_count: number;
    vfolder_bytes: number;
  };
}

export type Permission = 'ro' | 'rw' | 'wd';

export interface IVFolder {
  id: string;
  name: string;
  type: 'user' | 'project';
  owner: string;
  group: string | null;
  quota: number | null;
  status: 'creating' | 'ready' | 'trashed' | 'purging';
  created_at: number;
  trashed_at: number | null;
  permission: Permission;
  relation: 'own' | 'group' | 'shared';
  usage: number | null;
}

export interface ISessionLogs {
  session_id: string;
  live: boolean;
  logs: string;
}

/** A message of the events websocket (`{base_url}gpu-sessions/api/events`). */
export type ServerEvent =
  | { type: 'hello'; user: string; admin: boolean }
  | {
      type: 'status';
      session_id: string;
      status: SessionStatus;
      reason: string;
      at: number;
      owner: string;
      name: string;
      kernel_id: string | null;
    }
  | { type: 'gpus'; gpus: IGPU[] };
