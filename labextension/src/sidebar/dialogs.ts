// The sidebar's dialogs: confirmations and the small forms for a new vfolder and a share.

import { Dialog, showDialog } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { formatResources, vfolderNameProblem } from './format';
import type { ISession, Permission } from './types';

function paragraph(text: string): HTMLElement {
  const p = document.createElement('p');
  p.textContent = text;
  return p;
}

function field(label: string, input: HTMLElement): HTMLElement {
  const wrapper = document.createElement('label');
  wrapper.className = 'jp-gpu-sessions-field';
  const caption = document.createElement('span');
  caption.textContent = label;
  wrapper.append(caption, input);
  return wrapper;
}

function textInput(name: string, placeholder: string): HTMLInputElement {
  const input = document.createElement('input');
  input.className = 'jp-mod-styled';
  input.name = name;
  input.placeholder = placeholder;
  input.setAttribute('aria-label', placeholder);
  return input;
}

/** Ask before ending a session; true to go on. */
export async function confirmTerminate(session: ISession): Promise<boolean> {
  const label = session.name || session.id.slice(0, 12);
  const result = await showDialog({
    title: `Terminate ${label}?`,
    body: `Its kernel is shut down and what it holds (${formatResources(
      session.request
    )}) is freed.`,
    buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Terminate' })]
  });
  return result.button.accept;
}

/** The server refused because other sessions depend on this one: end them too? */
export async function confirmWithDependents(message: string): Promise<boolean> {
  const result = await showDialog({
    title: 'Other sessions depend on it',
    body: message,
    buttons: [
      Dialog.cancelButton(),
      Dialog.warnButton({ label: 'Terminate with dependents' })
    ]
  });
  return result.button.accept;
}

export async function confirmDeleteVFolder(name: string): Promise<boolean> {
  const result = await showDialog({
    title: `Delete vfolder ${name}?`,
    body: 'It goes to the trash, with every file: "Restore" in the sidebar brings it back.',
    buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Delete' })]
  });
  return result.button.accept;
}

class VFolderForm extends Widget implements Dialog.IBodyWidget<IVFolderForm> {
  constructor() {
    super();
    this.addClass('jp-gpu-sessions-form');
    this.name = textInput('name', 'vfolder name');
    this.quota = textInput('quota', 'quota, e.g. 10GiB (optional)');
    this.node.append(
      field('Name', this.name),
      field('Quota', this.quota),
      paragraph('It appears as /home/work/<name> in your kernels.')
    );
  }

  getValue(): IVFolderForm {
    return {
      name: this.name.value.trim(),
      quota: this.quota.value.trim() || null
    };
  }

  protected onAfterAttach(): void {
    this.name.focus();
  }

  readonly name: HTMLInputElement;
  readonly quota: HTMLInputElement;
}

export interface IVFolderForm {
  name: string;
  quota: string | null;
}

/** A new vfolder's name and quota; null when cancelled. A name the server would refuse
 * is said at once and asked again. */
export async function askNewVFolder(): Promise<IVFolderForm | null> {
  for (;;) {
    const result = await showDialog({
      title: 'Create vfolder',
      body: new VFolderForm(),
      focusNodeSelector: 'input[name="name"]',
      buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Create' })]
    });
    if (!result.button.accept || !result.value) {
      return null;
    }
    const problem = vfolderNameProblem(result.value.name);
    if (!problem) {
      return result.value;
    }
    await showDialog({
      title: 'Not a vfolder name',
      body: problem,
      buttons: [Dialog.okButton()]
    });
  }
}

export interface IShareForm {
  user: string;
  permission: Permission;
}

class ShareForm extends Widget implements Dialog.IBodyWidget<IShareForm> {
  constructor(vfolder: string) {
    super();
    this.addClass('jp-gpu-sessions-form');
    this.user = textInput('user', 'user name');
    this.permission = document.createElement('select');
    this.permission.className = 'jp-mod-styled';
    this.permission.setAttribute('aria-label', 'permission');
    for (const [value, text] of [
      ['ro', 'read-only'],
      ['rw', 'read-write'],
      ['wd', 'read-write-delete']
    ]) {
      const option = document.createElement('option');
      option.value = value;
      option.textContent = text;
      this.permission.append(option);
    }
    this.node.append(
      paragraph(
        `Invite a user to ${vfolder}; it is theirs to use once they accept.`
      ),
      field('User', this.user),
      field('Permission', this.permission)
    );
  }

  getValue(): IShareForm {
    return {
      user: this.user.value.trim(),
      permission: this.permission.value as Permission
    };
  }

  readonly user: HTMLInputElement;
  readonly permission: HTMLSelectElement;
}

/** Whom to share a vfolder with, and how; null when cancelled. */
export async function askShare(vfolder: string): Promise<IShareForm | null> {
  const result = await showDialog({
    title: `Share ${vfolder}`,
    body: new ShareForm(vfolder),
    focusNodeSelector: 'input[name="user"]',
    buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Invite' })]
  });
  if (!result.button.accept || !result.value || !result.value.user) {
    return null;
  }
  return result.value;
}
