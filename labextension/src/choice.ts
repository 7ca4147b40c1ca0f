// A notebook's resource choice: the launcher dialog's pure logic (the fields a kernelspec's
// JEP 87 schema offers, what each option means for this user right now, the prefill, and
// the notebook metadata the provisioner reads at every start).

/** Where the choice lives in a notebook's metadata (the vfolders already live there). */
export const METADATA_KEY = 'jupyter-gpu-sessions';

/** The part of a JSON Schema property the dialog reads. */
export interface ISchemaProperty {
  type?: string | string[];
  title?: string;
  description?: string;
  enum?: unknown[];
  default?: unknown;
  minimum?: number;
  maximum?: number;
  multipleOf?: number;
  pattern?: string;
  items?: ISchemaProperty;
  properties?: { [name: string]: ISchemaProperty };
}

/** What choosing one value means now: fine, forbidden by the policy (with the limit), or
 * allowed but busy (it will queue, and where). */
export interface IOptionState {
  state: 'ok' | 'forbidden' | 'queue';
  note: string;
}

/** The resources of a choice (one of gpus, gpu_profile, gpu_share asks for GPU capacity). */
export interface IResources {
  gpus?: number;
  gpu_profile?: string;
  gpu_share?: number;
  cpus?: number;
  memory?: string;
}

/** A vfolder mounted read-only or read-write. */
export interface IMount {
  name: string;
  permission: 'ro' | 'rw';
}

/** A notebook's choice, as saved in `metadata["jupyter-gpu-sessions"]`. */
export interface IChoice {
  resources: IResources;
  image?: string;
  vfolders: IMount[];
}

/** The GPU kinds a kernelspec offers: whole GPUs, a MIG instance or a time-sliced share. */
export type GPUMode = 'gpus' | 'gpu_profile' | 'gpu_share';

export const GPU_MODES: GPUMode[] = ['gpus', 'gpu_profile', 'gpu_share'];

/** One value offered for a field, with what choosing it means now. */
export interface IOption {
  value: string | number;
  label: string;
  state: IOptionState['state'];
  note: string;
}

/** A vfolder the user may mount, and the most it may be mounted with. */
export interface IVFolderOffer {
  name: string;
  /** `rw`: may be mounted read-write or read-only; `ro`: read-only only. */
  permission: 'rw' | 'ro';
}

/** What the dialog knows about one kernelspec (from `GET gpu-sessions/api/launcher`). */
export interface ILauncherSpec {
  name: string;
  display_name: string;
  /** Why it cannot be launched (an invalid kernelspec); absent when it can. */
  error?: string;
  /** The JEP 87 schema: `metadata.parameters` of the kernelspec, bounded by host and policy. */
  parameters: { properties?: { [name: string]: ISchemaProperty } };
  /** Per field: every value the server judged (also those the policy forbids), in order. */
  values: { [field: string]: (string | number)[] };
  /** Per field and value (as a string): what choosing it means now. Absent: fine. */
  options: { [field: string]: { [value: string]: IOptionState } };
  /** Per field: the most it may take and what sets it, where a field is typed. */
  limits: { [field: string]: string };
  vfolders: IVFolderOffer[];
}

/** The launcher's view: its kernelspecs and how many whole GPUs are free now. */
export interface ILauncherView {
  specs: ILauncherSpec[];
  freeGPUs: number | null;
}

/** One judged choice of `GET launcher`: `{value, status, limit?, position?, waits_for?}`. */
export function optionState(judged: { [key: string]: any }): IOptionState {
  if (judged.status === 'forbidden') {
    return {
      state: 'forbidden',
      note: String(judged.limit ?? 'forbidden by your policy')
    };
  }
  if (judged.status === 'would-queue') {
    const where =
      typeof judged.position === 'number'
        ? `#${judged.position} in the queue (${judged.queued_ahead ?? 0} ahead)`
        : 'in the queue';
    return {
      state: 'queue',
      note: judged.waits_for
        ? `${where}, waiting for ${judged.waits_for}`
        : where
    };
  }
  return { state: 'ok', note: '' };
}

/** `17179869184` → `16GiB` (as the server's sizes read). */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  const text = Number.isInteger(value) ? String(value) : value.toFixed(1);
  return `${text}${units[unit]}`;
}

/** `GET gpu-sessions/api/launcher`'s answer as the dialog reads it. */
export function parseLauncher(raw: any): ILauncherView {
  const offered: IVFolderOffer[] = (
    Array.isArray(raw?.vfolders) ? raw.vfolders : []
  )
    .filter((v: any) => v && typeof v.name === 'string')
    .map((v: any) => ({
      name: v.name,
      permission: Array.isArray(v.mount_permissions)
        ? v.mount_permissions.includes('rw')
          ? 'rw'
          : 'ro'
        : v.permission === 'ro'
          ? 'ro'
          : 'rw'
    }));
  const specs: ILauncherSpec[] = [];
  for (const entry of Array.isArray(raw?.kernelspecs) ? raw.kernelspecs : []) {
    if (!entry || typeof entry.name !== 'string') {
      continue;
    }
    const spec: ILauncherSpec = {
      name: entry.name,
      display_name: String(entry.display_name ?? entry.name),
      parameters: entry.parameters ?? {},
      values: {},
      options: {},
      limits: {},
      vfolders: []
    };
    if (entry.error) {
      spec.error = String(entry.error);
    }
    for (const [field, judged] of Object.entries<any>(entry.choices ?? {})) {
      if (Array.isArray(judged)) {
        spec.values[field] = judged.map((j: any) => j.value);
        spec.options[field] = {};
        for (const j of judged) {
          spec.options[field][String(j.value)] = optionState(j);
        }
      } else if (
        judged &&
        typeof judged === 'object' &&
        judged.maximum !== undefined
      ) {
        const most =
          judged.maximum === null
            ? ''
            : field === 'memory'
              ? formatBytes(judged.maximum)
              : String(judged.maximum);
        const by = judged.limit ? String(judged.limit) : '';
        spec.limits[field] = most
          ? `at most ${most}${by ? ` (${by})` : ''}`
          : by;
      }
    }
    // The vfolders this kernelspec may mount (a local kernel: only its own).
    const names = fieldSchema(spec, 'vfolders')?.items?.properties?.name?.enum;
    spec.vfolders = Array.isArray(names)
      ? names
          .filter((n): n is string => typeof n === 'string')
          .map(
            n =>
              offered.find(o => o.name === n) ?? { name: n, permission: 'rw' }
          )
      : offered;
    specs.push(spec);
  }
  const free = raw?.free?.gpus;
  return { specs, freeGPUs: typeof free === 'number' ? free : null };
}

const RESOURCE_FIELDS = [
  'gpus',
  'gpu_profile',
  'gpu_share',
  'cpus',
  'memory'
] as const;

/** The schema of one field: under `properties.resources` or at the top (both are read). */
export function fieldSchema(
  spec: Pick<ILauncherSpec, 'parameters'>,
  field: string
): ISchemaProperty | undefined {
  const top = spec.parameters?.properties ?? {};
  return top.resources?.properties?.[field] ?? top[field];
}

/** The GPU modes this kernelspec's schema offers, in display order. */
export function gpuModes(spec: Pick<ILauncherSpec, 'parameters'>): GPUMode[] {
  return GPU_MODES.filter(mode => fieldSchema(spec, mode) !== undefined);
}

function isNumeric(property: ISchemaProperty): boolean {
  const types = Array.isArray(property.type) ? property.type : [property.type];
  return types.includes('integer') || types.includes('number');
}

/** The values a field offers: its enum, or a bounded numeric range stepped by its
 * multipleOf (1 for integers); `null` when it is typed rather than chosen. */
export function fieldValues(
  property: ISchemaProperty
): (string | number)[] | null {
  if (Array.isArray(property.enum)) {
    return property.enum.filter(
      (v): v is string | number =>
        typeof v === 'string' || typeof v === 'number'
    );
  }
  if (!isNumeric(property)) {
    return null;
  }
  const { minimum, maximum } = property;
  if (minimum === undefined || maximum === undefined || maximum < minimum) {
    return null;
  }
  const integer = (
    Array.isArray(property.type) ? property.type : [property.type]
  ).includes('integer');
  if (!integer && property.multipleOf === undefined) {
    return null; // a real number with no step is typed
  }
  const step = property.multipleOf ?? 1;
  const count = Math.floor((maximum - minimum) / step + 1e-9) + 1;
  if (count > 65) {
    return null;
  }
  const values: number[] = [];
  for (let i = 0; i < count; i++) {
    values.push(Number((minimum + i * step).toFixed(6)));
  }
  return values;
}

/** A field's offered values, each with its state and the text the dialog shows. */
export function fieldOptions(
  spec: ILauncherSpec,
  field: string,
  unit: (value: string | number) => string = v => String(v)
): IOption[] | null {
  const property = fieldSchema(spec, field);
  const values = offeredValues(spec, field, property);
  if (!values) {
    return null;
  }
  return values.map(value => {
    const known = spec.options[field]?.[String(value)];
    const state = known?.state ?? 'ok';
    const note = known?.note ?? '';
    const label =
      state === 'ok'
        ? unit(value)
        : state === 'forbidden'
          ? `${unit(value)} — not allowed: ${note}`
          : `${unit(value)} — busy now, will queue${note ? `: ${note}` : ''}`;
    return { value, label, state, note };
  });
}

/** The values shown for a field: those the server judged (the forbidden ones too, to be
 * shown disabled) and those its schema allows, in order. */
function offeredValues(
  spec: ILauncherSpec,
  field: string,
  property: ISchemaProperty | undefined
): (string | number)[] | null {
  const judged = spec.values[field];
  const allowed = property ? fieldValues(property) : null;
  if (!judged && !allowed) {
    return null;
  }
  const all = [...(allowed ?? [])];
  for (const value of judged ?? []) {
    if (!all.some(v => v === value)) {
      all.push(value);
    }
  }
  return typeof all[0] === 'number'
    ? (all as number[]).sort((a, b) => a - b)
    : all;
}

/** The kernelspec's own defaults, as a choice. */
export function specDefaults(spec: ILauncherSpec): IChoice {
  const resources: IResources = {};
  for (const field of RESOURCE_FIELDS) {
    const value = fieldSchema(spec, field)?.default;
    if (value !== undefined && value !== null) {
      (resources as any)[field] = value;
    }
  }
  // An empty profile and a zero share mean "not this GPU form" in the schema's defaults.
  if (!resources.gpu_profile) {
    delete resources.gpu_profile;
  }
  if (!resources.gpu_share) {
    delete resources.gpu_share;
  }
  const image = fieldSchema(spec, 'image')?.default;
  return {
    resources,
    ...(typeof image === 'string' ? { image } : {}),
    vfolders: parseMounts(fieldSchema(spec, 'vfolders')?.default)
  };
}

/** Whether `value` is one the field may take (in its enum or range, of its type) and is
 * not forbidden by the policy. */
export function acceptable(
  spec: ILauncherSpec,
  field: string,
  value: unknown
): boolean {
  const property = fieldSchema(spec, field);
  if (!property || value === undefined || value === null) {
    return false;
  }
  if (spec.options[field]?.[String(value)]?.state === 'forbidden') {
    return false;
  }
  const values = fieldValues(property);
  if (values) {
    return (
      values.some(v => v === value) ||
      (spec.values[field] ?? []).some(v => v === value)
    );
  }
  if (spec.values[field]?.some(v => v === value)) {
    return true;
  }
  if (isNumeric(property)) {
    return (
      typeof value === 'number' &&
      (property.minimum === undefined || value >= property.minimum) &&
      (property.maximum === undefined || value <= property.maximum)
    );
  }
  if (typeof value !== 'string' || value.length === 0) {
    return false;
  }
  return (
    property.pattern === undefined || new RegExp(property.pattern).test(value)
  );
}

/** The GPU mode a choice uses: a MIG profile or a share when one is set (a non-empty
 * profile, a share above 0), else whole GPUs. */
export function modeOf(resources: IResources): GPUMode {
  if (resources.gpu_profile) {
    return 'gpu_profile';
  }
  if (resources.gpu_share) {
    return 'gpu_share';
  }
  return 'gpus';
}

/**
 * The dialog's starting choice: the kernelspec's defaults, overridden field by field by
 * the earlier choices given (the user's last choice, then the notebook's own) where the
 * value is still offered and allowed. A GPU mode comes whole from one source.
 */
export function prefill(
  spec: ILauncherSpec,
  ...earlier: (IChoice | null)[]
): IChoice {
  const choice = specDefaults(spec);
  for (const source of earlier) {
    if (!source) {
      continue;
    }
    const mode = modeOf(source.resources);
    const wanted = source.resources[mode];
    if (acceptable(spec, mode, wanted)) {
      for (const m of GPU_MODES) {
        delete choice.resources[m];
      }
      (choice.resources as any)[mode] = wanted;
    }
    for (const field of ['cpus', 'memory'] as const) {
      if (acceptable(spec, field, source.resources[field])) {
        (choice.resources as any)[field] = source.resources[field];
      }
    }
    if (acceptable(spec, 'image', source.image)) {
      choice.image = source.image;
    }
    // Only the vfolders still offered, never with more than the user's permission now.
    const offered = new Map(spec.vfolders.map(v => [v.name, v.permission]));
    choice.vfolders = source.vfolders
      .filter(m => offered.has(m.name))
      .map(m => ({
        name: m.name,
        permission: offered.get(m.name) === 'ro' ? 'ro' : m.permission
      }));
  }
  return choice;
}

/** Mounts as saved: `{"name", "permission"}` objects, or `"name"` / `"name:ro"` strings
 * (as earlier versions saved them). Anything else is left out. */
export function parseMounts(value: unknown): IMount[] {
  if (!Array.isArray(value)) {
    return [];
  }
  const mounts: IMount[] = [];
  for (const item of value) {
    if (typeof item === 'string' && item) {
      const [name, permission] = item.split(':', 2);
      mounts.push({ name, permission: permission === 'ro' ? 'ro' : 'rw' });
    } else if (
      item &&
      typeof item === 'object' &&
      typeof item.name === 'string'
    ) {
      mounts.push({
        name: item.name,
        permission: item.permission === 'ro' ? 'ro' : 'rw'
      });
    }
  }
  return mounts;
}

/** Problems that make a choice unusable (shown in the dialog; OK stays off meanwhile). */
export function problems(spec: ILauncherSpec, choice: IChoice): string[] {
  const found: string[] = [];
  const mode = modeOf(choice.resources);
  for (const field of [mode, 'cpus', 'memory'] as const) {
    const value = choice.resources[field];
    if (value === undefined || !fieldSchema(spec, field)) {
      continue;
    }
    const known = spec.options[field]?.[String(value)];
    if (known?.state === 'forbidden') {
      found.push(`${field} ${value} is not allowed: ${known.note}`);
    } else if (!acceptable(spec, field, value)) {
      const limit = spec.limits[field];
      found.push(
        `${field} ${value} is not offered${limit ? ` (${limit})` : ''}`
      );
    }
  }
  if (choice.image !== undefined && !acceptable(spec, 'image', choice.image)) {
    found.push(`image ${choice.image} is not allowed`);
  }
  return found;
}

/** The metadata value of a choice: only the fields set, GPU mode exclusive. */
export function toMetadata(choice: IChoice): {
  resources: IResources;
  image?: string;
  vfolders: IMount[];
} {
  const resources: IResources = {};
  const mode = modeOf(choice.resources);
  if (choice.resources[mode] !== undefined) {
    (resources as any)[mode] = choice.resources[mode];
  }
  for (const field of ['cpus', 'memory'] as const) {
    if (choice.resources[field] !== undefined) {
      (resources as any)[field] = choice.resources[field];
    }
  }
  return {
    resources,
    ...(choice.image !== undefined ? { image: choice.image } : {}),
    vfolders: choice.vfolders.map(m => ({
      name: m.name,
      permission: m.permission
    }))
  };
}

/** A notebook's saved choice, or null when its metadata holds none (or not a valid one).
 * Other keys under METADATA_KEY are kept by the callers (they merge, never replace). */
export function fromMetadata(value: unknown): IChoice | null {
  if (!value || typeof value !== 'object') {
    return null;
  }
  const raw = value as { [key: string]: unknown };
  const resources: IResources = {};
  const given = raw.resources;
  if (given && typeof given === 'object') {
    const r = given as { [key: string]: unknown };
    for (const field of ['gpus', 'gpu_share', 'cpus'] as const) {
      if (typeof r[field] === 'number') {
        resources[field] = r[field] as number;
      }
    }
    for (const field of ['gpu_profile', 'memory'] as const) {
      if (typeof r[field] === 'string') {
        resources[field] = r[field] as string;
      }
    }
  }
  const vfolders = parseMounts(raw.vfolders);
  if (
    Object.keys(resources).length === 0 &&
    typeof raw.image !== 'string' &&
    !vfolders.length
  ) {
    return null;
  }
  return {
    resources,
    ...(typeof raw.image === 'string' ? { image: raw.image } : {}),
    vfolders
  };
}

/** The metadata to write: what was there (other keys kept) with the choice's keys set. */
export function mergeMetadata(
  existing: unknown,
  choice: IChoice
): { [key: string]: unknown } {
  const base =
    existing && typeof existing === 'object'
      ? { ...(existing as { [key: string]: unknown }) }
      : {};
  delete base.image; // a choice without an image must not keep an older one
  return { ...base, ...toMetadata(choice) };
}

/** A short summary of a choice: `1 GPU · 2 CPUs · 8GiB`. */
export function summary(choice: IChoice): string {
  const r = choice.resources;
  const parts: string[] = [];
  if (r.gpu_profile) {
    parts.push(`MIG ${r.gpu_profile}`);
  } else if (r.gpu_share) {
    parts.push(`${r.gpu_share} of a GPU`);
  } else if (r.gpus !== undefined) {
    parts.push(
      r.gpus === 0 ? 'no GPU' : `${r.gpus} GPU${r.gpus === 1 ? '' : 's'}`
    );
  }
  if (r.cpus !== undefined) {
    parts.push(`${r.cpus} CPU${r.cpus === 1 ? '' : 's'}`);
  }
  if (r.memory !== undefined) {
    parts.push(r.memory);
  }
  return parts.join(' · ');
}

/** Whole GPUs free in a GPU tick of the events stream: not in MIG mode, held by nobody
 * (a GPU with shares taken is not free for a whole-GPU session). */
export function freeInTick(
  gpus: { mig_mode?: boolean; holders?: unknown[] }[]
): number {
  return gpus.filter(g => !g.mig_mode && !(g.holders ?? []).length).length;
}

/** The launcher card's label: `Python 3 (1 GPU) · 3 GPUs free`. */
export function cardLabel(
  displayName: string,
  freeGPUs: number | null
): string {
  if (freeGPUs === null) {
    return displayName;
  }
  return `${displayName} · ${freeGPUs} GPU${freeGPUs === 1 ? '' : 's'} free`;
}
