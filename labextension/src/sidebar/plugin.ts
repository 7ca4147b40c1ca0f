// The "GPU Sessions" sidebar plugin: the panel in the left area, its commands in the
// command palette (category "GPU Sessions"), kept current from the events websocket.

import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  ICommandPalette,
  MainAreaWidget,
  showErrorMessage
} from '@jupyterlab/apputils';

import { CATEGORY, CommandIDs } from './commandIds';
import {
  askNewVFolder,
  askShare,
  confirmDeleteVFolder,
  confirmTerminate,
  confirmWithDependents
} from './dialogs';
import { createLogWidget, LogView } from './logs';
import {
  canTerminate,
  hasLogs,
  ITerminateUI,
  SidebarModel,
  terminateSession
} from './model';
import { GPUSessionsPanel } from './panel';
import { IGPUSessionEvents } from '../events';
import { errorStatus, sidebarClient } from './client';
import type { ServerEvent } from './types';

function sessionArg(model: SidebarModel, args: Record<string, any>) {
  const id = (args.id as string | undefined) ?? model.selectedSession;
  return model.sessions.find(s => s.id === id) ?? null;
}

function vfolderArg(
  model: SidebarModel,
  args: Record<string, any>
): string | null {
  return (args.name as string | undefined) ?? model.selectedVFolder;
}

/**
 * Whether the vfolder a command names (or the selected one) is the caller's own: only an
 * owner shares or trashes it.
 */
function ownsVFolder(model: SidebarModel, args: Record<string, any>): boolean {
  const name = vfolderArg(model, args);
  return model.vfolders.some(v => v.name === name && v.relation === 'own');
}

export const sidebarPlugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-gpu-sessions:sidebar',
  description: 'The GPU Sessions sidebar: sessions, GPUs, vfolders and quota.',
  autoStart: true,
  requires: [IGPUSessionEvents],
  optional: [ICommandPalette, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    events: IGPUSessionEvents,
    palette: ICommandPalette | null,
    restorer: ILayoutRestorer | null
  ) => {
    const client = sidebarClient(app.serviceManager.serverSettings);
    const model = new SidebarModel(client);
    const panel = new GPUSessionsPanel(model, app.commands);
    app.shell.add(panel, 'left', { rank: 600, type: 'GPU Sessions' });
    if (restorer) {
      restorer.add(panel, panel.id);
    }
    // Live from the events websocket (or its polling stand-in); what was missed while it
    // was down is read again once it is back.
    events.received.connect((_, event) =>
      model.handleEvent(event as ServerEvent)
    );
    events.connectionChanged.connect((_, connected) => {
      if (connected) {
        void model.refresh();
      }
    });
    const logs = new Map<string, MainAreaWidget<LogView>>();
    const { commands } = app;

    const fail = (title: string) => (error: unknown) =>
      showErrorMessage(title, (error as Error).message ?? String(error));
    const vfolderLabel = (args: Record<string, any>, text: string) => {
      const name = args.name ?? model.selectedVFolder;
      return name ? `${text} ${name}` : text;
    };

    commands.addCommand(CommandIDs.open, {
      label: 'Open GPU Sessions Panel',
      caption: 'Sessions, GPUs, vfolders and quota',
      execute: () => app.shell.activateById(panel.id)
    });
    commands.addCommand(CommandIDs.refresh, {
      label: 'Refresh GPU Sessions',
      execute: () => model.refresh()
    });
    commands.addCommand(CommandIDs.toggleEnded, {
      label: 'Show Ended GPU Sessions',
      isToggled: () => model.showEnded,
      execute: () => model.setShowEnded(!model.showEnded)
    });
    commands.addCommand(CommandIDs.toggleAllOwners, {
      label: "Show All Owners' GPU Sessions",
      caption: 'Admins: everyone’s sessions, or only yours',
      isVisible: () => model.admin,
      isEnabled: () => model.admin,
      isToggled: () => model.filter.kind !== 'mine',
      execute: () =>
        model.setFilter(
          model.filter.kind === 'mine' ? { kind: 'all' } : { kind: 'mine' }
        )
    });

    const terminateUI: ITerminateUI = {
      confirm: confirmTerminate,
      confirmDependents: confirmWithDependents,
      fail: fail('Could not terminate')
    };
    const terminate = (args: Record<string, any>, recursive: boolean) =>
      terminateSession(
        model,
        sessionArg(model, args),
        recursive,
        terminateUI,
        errorStatus
      );
    commands.addCommand(CommandIDs.terminate, {
      label: args =>
        args.id ? 'Terminate GPU Session' : 'Terminate Selected GPU Session',
      isEnabled: args => canTerminate(sessionArg(model, args)),
      execute: args => terminate(args, false)
    });
    commands.addCommand(CommandIDs.terminateWithDependents, {
      label: 'Terminate Selected GPU Session with Its Dependents',
      isEnabled: args => canTerminate(sessionArg(model, args)),
      execute: args => terminate(args, true)
    });
    commands.addCommand(CommandIDs.showLogs, {
      label: args =>
        args.id ? 'Show GPU Session Log' : 'Show Log of Selected GPU Session',
      isEnabled: args => hasLogs(sessionArg(model, args)),
      execute: args => {
        const session = sessionArg(model, args);
        if (!session || !hasLogs(session)) {
          return;
        }
        let widget = logs.get(session.id);
        if (!widget || widget.isDisposed) {
          widget = createLogWidget(
            client,
            session.id,
            session.name || session.id.slice(0, 12)
          );
          logs.set(session.id, widget);
          widget.disposed.connect(() => logs.delete(session.id));
          app.shell.add(widget, 'main', { mode: 'split-bottom' });
        }
        app.shell.activateById(widget.id);
        void widget.content.load();
      }
    });
    commands.addCommand(CommandIDs.createVFolder, {
      label: 'Create vfolder…',
      execute: async () => {
        const form = await askNewVFolder();
        if (form) {
          await model
            .createVFolder(form.name, form.quota)
            .catch(fail('Could not create the vfolder'));
        }
      }
    });
    commands.addCommand(CommandIDs.shareVFolder, {
      label: args => vfolderLabel(args, 'Share vfolder'),
      isEnabled: args => ownsVFolder(model, args),
      execute: async args => {
        const name = vfolderArg(model, args);
        if (!name) {
          return;
        }
        const form = await askShare(name);
        if (form) {
          await model
            .shareVFolder(name, form.user, form.permission)
            .catch(fail('Could not share the vfolder'));
        }
      }
    });
    commands.addCommand(CommandIDs.deleteVFolder, {
      label: args => vfolderLabel(args, 'Move vfolder to Trash:'),
      isEnabled: args => ownsVFolder(model, args),
      execute: async args => {
        const name = vfolderArg(model, args);
        if (name && (await confirmDeleteVFolder(name))) {
          await model
            .deleteVFolder(name)
            .catch(fail('Could not delete the vfolder'));
        }
      }
    });
    commands.addCommand(CommandIDs.restoreVFolder, {
      label: args => vfolderLabel(args, 'Restore vfolder from Trash:'),
      isEnabled: args =>
        model.trash.some(v => v.name === vfolderArg(model, args)),
      execute: async args => {
        const name = vfolderArg(model, args);
        if (name) {
          await model
            .restoreVFolder(name)
            .catch(fail('Could not restore the vfolder'));
        }
      }
    });

    model.changed.connect(() => {
      for (const id of [
        CommandIDs.terminate,
        CommandIDs.terminateWithDependents,
        CommandIDs.showLogs,
        CommandIDs.shareVFolder,
        CommandIDs.deleteVFolder,
        CommandIDs.restoreVFolder,
        CommandIDs.toggleEnded,
        CommandIDs.toggleAllOwners
      ]) {
        commands.notifyCommandChanged(id);
      }
    });

    if (palette) {
      for (const command of Object.values(CommandIDs)) {
        palette.addItem({ command, category: CATEGORY });
      }
    }
    void model.refresh();
  }
};

export default sidebarPlugin;
