// The resource dialog's form: image, GPUs (or a MIG profile or a share), CPUs, memory and
// vfolders for one kernelspec, from its JEP 87 schema as the server bounds it for this user
// now. Plain DOM controls, each labelled, styled by the theme's variables.

import type { Dialog } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import {
  fieldOptions,
  fieldSchema,
  gpuModes,
  GPUMode,
  IChoice,
  ILauncherSpec,
  IMount,
  IOption,
  modeOf,
  problems
} from './choice';

const MODE_LABELS: { [mode in GPUMode]: string } = {
  gpus: 'Whole GPUs',
  gpu_profile: 'MIG instance',
  gpu_share: 'Share of a GPU'
};

let counter = 0;

/** The dialog's form; `getValue()` is the choice as it stands. */
export class ResourceForm
  extends Widget
  implements Dialog.IBodyWidget<IChoice>
{
  constructor(
    readonly spec: ILauncherSpec,
    initial: IChoice,
    shownProblems: string[] = []
  ) {
    super({ node: document.createElement('form') });
    this.addClass('jp-gpu-sessions-resources');
    this._id = `jp-gpu-sessions-form-${++counter}`;
    this.node.addEventListener('submit', event => event.preventDefault());
    this.node.setAttribute('aria-label', `Resources for ${spec.display_name}`);
    this._build(initial, shownProblems);
  }

  getValue(): IChoice {
    const resources: IChoice['resources'] = {};
    const mode = this._mode();
    if (mode === 'gpus' && this._gpus) {
      resources.gpus = Number(this._gpus.value);
    } else if (mode === 'gpu_profile' && this._profile) {
      resources.gpu_profile = this._profile.value;
    } else if (mode === 'gpu_share' && this._share) {
      resources.gpu_share = Number(this._share.value);
    }
    if (this._cpus && this._cpus.value.trim() !== '') {
      resources.cpus = Number(this._cpus.value);
    }
    if (this._memory && this._memory.value.trim() !== '') {
      resources.memory = this._memory.value.trim();
    }
    const vfolders: IMount[] = [];
    for (const row of this._vfolders) {
      if (row.mount.checked) {
        vfolders.push({
          name: row.name,
          permission: row.permission.value === 'ro' ? 'ro' : 'rw'
        });
      }
    }
    const choice: IChoice = { resources, vfolders };
    if (this._image) {
      choice.image = this._image.value;
    }
    return choice;
  }

  /** What is wrong with the choice as it stands (none: it may be started). */
  problems(): string[] {
    return problems(this.spec, this.getValue());
  }

  private _build(initial: IChoice, shownProblems: string[]): void {
    const spec = this.spec;
    const alert = document.createElement('div');
    alert.className = 'jp-gpu-sessions-problems';
    alert.setAttribute('role', 'alert');
    alert.textContent = shownProblems.join('\n');
    alert.hidden = shownProblems.length === 0;
    this.node.appendChild(alert);

    const images = fieldOptions(spec, 'image', v =>
      v === '' ? 'Server default image' : `${v}`
    );
    if (images && images.length) {
      this._image = this._select('image', 'Image', images, initial.image ?? '');
    }

    const modes = gpuModes(spec).filter(mode => this._offers(mode));
    const mode = modes.includes(modeOf(initial.resources))
      ? modeOf(initial.resources)
      : 'gpus';
    if (modes.length > 1) {
      const fieldset = document.createElement('fieldset');
      fieldset.className = 'jp-gpu-sessions-mode';
      const legend = document.createElement('legend');
      legend.textContent = 'GPU';
      fieldset.appendChild(legend);
      for (const m of modes) {
        const label = document.createElement('label');
        const radio = document.createElement('input');
        radio.type = 'radio';
        radio.name = `${this._id}-mode`;
        radio.value = m;
        radio.checked = m === mode;
        radio.addEventListener('change', () => this._showMode());
        label.append(radio, ` ${MODE_LABELS[m]}`);
        fieldset.appendChild(label);
        this._modeRadios.push(radio);
      }
      this.node.appendChild(fieldset);
    }
    if (modes.includes('gpus')) {
      const options = fieldOptions(spec, 'gpus', v =>
        Number(v) === 1 ? '1 GPU' : `${v} GPUs`
      );
      if (options) {
        this._gpus = this._select(
          'gpus',
          'GPUs',
          options,
          initial.resources.gpus ?? 0
        );
      }
    }
    if (modes.includes('gpu_profile')) {
      const options = (fieldOptions(spec, 'gpu_profile') ?? []).filter(
        o => o.value !== ''
      );
      this._profile = this._select(
        'gpu_profile',
        'MIG profile',
        options,
        initial.resources.gpu_profile ?? ''
      );
    }
    if (modes.includes('gpu_share')) {
      const options = (
        fieldOptions(
          spec,
          'gpu_share',
          v => `${Number(v) * 100}% of one GPU`
        ) ?? []
      ).filter(o => Number(o.value) > 0);
      if (options.length) {
        this._share = this._select(
          'gpu_share',
          'Share',
          options,
          initial.resources.gpu_share ?? options[0].value
        );
      } else {
        const schema = fieldSchema(spec, 'gpu_share') ?? {};
        this._share = this._number('gpu_share', 'Share of one GPU', {
          min: 0.01,
          max: schema.maximum ?? 0.99,
          step: 0.01,
          value: initial.resources.gpu_share ?? 0.25
        });
      }
    }
    const cpuSchema = fieldSchema(spec, 'cpus');
    if (cpuSchema) {
      this._cpus = this._number('cpus', 'CPUs', {
        min: cpuSchema.minimum ?? 0.01,
        max: cpuSchema.maximum,
        step: 0.01,
        value: initial.resources.cpus
      });
    }
    const memorySchema = fieldSchema(spec, 'memory');
    if (memorySchema) {
      const input = document.createElement('input');
      input.type = 'text';
      input.placeholder = 'e.g. 8GiB (empty: no limit)';
      if (memorySchema.pattern) {
        input.pattern = memorySchema.pattern;
      }
      input.value = initial.resources.memory ?? '';
      this._row('memory', 'Memory', input);
      this._memory = input;
    }
    if (spec.vfolders.length) {
      this._vfolderTable(initial.vfolders);
    }
    this._showMode();
  }

  /** Whether a GPU mode has anything to choose (a profile list that is not empty, a share
   * whose maximum is above 0). */
  private _offers(mode: GPUMode): boolean {
    const schema = fieldSchema(this.spec, mode);
    if (!schema) {
      return false;
    }
    if (mode === 'gpu_profile') {
      return Array.isArray(schema.enum) && schema.enum.some(v => v !== '');
    }
    if (mode === 'gpu_share') {
      return (schema.maximum ?? 0) > 0;
    }
    return true;
  }

  private _mode(): GPUMode {
    const checked = this._modeRadios.find(r => r.checked);
    if (checked) {
      return checked.value as GPUMode;
    }
    return this._gpus
      ? 'gpus'
      : this._profile
        ? 'gpu_profile'
        : this._share
          ? 'gpu_share'
          : 'gpus';
  }

  private _showMode(): void {
    const mode = this._mode();
    const rows: [GPUMode, HTMLElement | null][] = [
      ['gpus', this._gpus],
      ['gpu_profile', this._profile],
      ['gpu_share', this._share]
    ];
    for (const [m, element] of rows) {
      const row = element?.closest(
        '.jp-gpu-sessions-field'
      ) as HTMLElement | null;
      if (row) {
        row.hidden = m !== mode;
      }
    }
  }

  private _row(field: string, text: string, control: HTMLElement): HTMLElement {
    const row = document.createElement('div');
    row.className = 'jp-gpu-sessions-field';
    row.dataset.field = field;
    const id = `${this._id}-${field}`;
    control.id = id;
    control.setAttribute('name', field);
    const label = document.createElement('label');
    label.htmlFor = id;
    label.textContent = text;
    row.append(label, control);
    const limit = this.spec.limits[field];
    if (limit) {
      const note = document.createElement('span');
      note.className = 'jp-gpu-sessions-limit';
      note.id = `${id}-limit`;
      note.textContent = limit;
      control.setAttribute('aria-describedby', note.id);
      row.appendChild(note);
    }
    this.node.appendChild(row);
    return row;
  }

  private _select(
    field: string,
    text: string,
    options: IOption[],
    selected: string | number
  ): HTMLSelectElement {
    const select = document.createElement('select');
    for (const option of options) {
      const element = document.createElement('option');
      element.value = String(option.value);
      element.textContent = option.label;
      element.disabled = option.state === 'forbidden';
      element.dataset.state = option.state;
      element.selected = String(option.value) === String(selected);
      select.appendChild(element);
    }
    const row = this._row(field, text, select);
    // What the selected value means now (busy: it will queue, and where).
    const status = document.createElement('div');
    status.className = 'jp-gpu-sessions-option-status';
    status.setAttribute('aria-live', 'polite');
    row.appendChild(status);
    const update = () => {
      const option = options.find(o => String(o.value) === select.value);
      status.textContent =
        option?.state === 'queue'
          ? `Busy now: will queue — ${option.note}`
          : '';
      status.hidden = !status.textContent;
    };
    select.addEventListener('change', update);
    update();
    return select;
  }

  private _number(
    field: string,
    text: string,
    bounds: { min?: number; max?: number; step: number; value?: number }
  ): HTMLInputElement {
    const input = document.createElement('input');
    input.type = 'number';
    input.step = String(bounds.step);
    if (bounds.min !== undefined) {
      input.min = String(bounds.min);
    }
    if (bounds.max !== undefined) {
      input.max = String(bounds.max);
    }
    input.value = bounds.value === undefined ? '' : String(bounds.value);
    this._row(field, text, input);
    return input;
  }

  private _vfolderTable(chosen: IMount[]): void {
    const fieldset = document.createElement('fieldset');
    fieldset.className = 'jp-gpu-sessions-vfolders';
    const legend = document.createElement('legend');
    legend.textContent = 'vfolders (mounted at /home/work/<name>)';
    fieldset.appendChild(legend);
    for (const offer of this.spec.vfolders) {
      const mounted = chosen.find(m => m.name === offer.name);
      const row = document.createElement('div');
      row.className = 'jp-gpu-sessions-vfolder';
      const id = `${this._id}-vfolder-${offer.name}`;
      const mount = document.createElement('input');
      mount.type = 'checkbox';
      mount.id = id;
      mount.checked = mounted !== undefined;
      const label = document.createElement('label');
      label.htmlFor = id;
      label.textContent = offer.name;
      const permission = document.createElement('select');
      permission.setAttribute('aria-label', `Permission for ${offer.name}`);
      for (const [value, text] of [
        ['rw', 'read-write'],
        ['ro', 'read-only']
      ]) {
        const option = document.createElement('option');
        option.value = value;
        option.textContent = text;
        // Never more than the user's own permission on the vfolder.
        option.disabled = value === 'rw' && offer.permission === 'ro';
        permission.appendChild(option);
      }
      permission.value =
        offer.permission === 'ro' ? 'ro' : (mounted?.permission ?? 'rw');
      row.append(mount, label, permission);
      fieldset.appendChild(row);
      this._vfolders.push({ name: offer.name, mount, permission });
    }
    this.node.appendChild(fieldset);
  }

  private _id: string;
  private _image: HTMLSelectElement | null = null;
  private _gpus: HTMLSelectElement | null = null;
  private _profile: HTMLSelectElement | null = null;
  private _share: HTMLInputElement | HTMLSelectElement | null = null;
  private _cpus: HTMLInputElement | null = null;
  private _memory: HTMLInputElement | null = null;
  private _modeRadios: HTMLInputElement[] = [];
  private _vfolders: {
    name: string;
    mount: HTMLInputElement;
    permission: HTMLSelectElement;
  }[] = [];
}
