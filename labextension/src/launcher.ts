// The launcher's "GPU Sessions" category (a card per GPU session kernelspec, with the GPUs
// free now), the resource dialog behind each card, and "Change GPU Resources…" on the
// notebook's Kernel menu.

import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  Dialog,
  ICommandPalette,
  showDialog,
  showErrorMessage
} from '@jupyterlab/apputils';
import { ILauncher } from '@jupyterlab/launcher';
import { IMainMenu } from '@jupyterlab/mainmenu';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IStateDB } from '@jupyterlab/statedb';
import { LabIcon } from '@jupyterlab/ui-components';
import { ReadonlyJSONValue } from '@lumino/coreutils';

import { requestAPI } from './api';
import {
  cardLabel,
  freeInTick,
  fromMetadata,
  IChoice,
  ILauncherSpec,
  ILauncherView,
  mergeMetadata,
  METADATA_KEY,
  parseLauncher,
  prefill,
  summary,
  toMetadata
} from './choice';
import { chooseResources } from './dialog';
import { IGPUSessionEvents } from './events';

export const CATEGORY = 'GPU Sessions';
const STATE_KEY = 'jupyter-gpu-sessions:last-choice';
// Fallback refresh of the free-GPU counts when no event has come meanwhile.
const REFRESH_MS = 15_000;
// How old a view the dialog opens on (events refresh it at every change they see).
const FRESH_MS = 5_000;

export namespace CommandIDs {
  export const newNotebook = 'gpu-sessions:new-notebook';
  export const changeResources = 'gpu-sessions:change-resources';
}

const GPU_SVG = `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" width="16">
<g class="jp-icon3" fill="#616161"><path d="M3 6h15v12H3zM5 8v8h11V8zM19 8h2v2h-2zM19 14h2v2h-2zM7 18h2v2H7zM12 18h2v2h-2z"/>
<circle cx="10.5" cy="12" r="2.5"/></g></svg>`;

export const gpuIcon = new LabIcon({
  name: 'jupyter-gpu-sessions:gpu',
  svgstr: GPU_SVG
});

/** The launcher's data, kept fresh: refetched on session events and on a timer. */
class LauncherState {
  constructor(private readonly _app: JupyterFrontEnd) {}

  view: ILauncherView = { specs: [], freeGPUs: null };
  fetchedAt = 0;

  spec(name: string): ILauncherSpec | undefined {
    return this.view.specs.find(s => s.name === name);
  }

  /** Fetch the launcher's view now (the schema and judgments as the server has them). */
  async refresh(): Promise<ILauncherView> {
    const raw = await requestAPI<unknown>(
      this._app.serviceManager.serverSettings,
      'launcher'
    );
    this.view = parseLauncher(raw);
    this.fetchedAt = Date.now();
    return this.view;
  }
}

async function lastChoices(
  state: IStateDB | null
): Promise<{ [kernel: string]: unknown }> {
  if (!state) {
    return {};
  }
  const saved = await state.fetch(STATE_KEY);
  return saved && typeof saved === 'object'
    ? { ...(saved as { [kernel: string]: unknown }) }
    : {};
}

async function rememberChoice(
  state: IStateDB | null,
  kernel: string,
  choice: IChoice
): Promise<void> {
  if (!state) {
    return;
  }
  const all = await lastChoices(state);
  all[kernel] = toMetadata(choice);
  await state.save(STATE_KEY, all as ReadonlyJSONValue);
}

/**
 * Create the notebook with its choice already saved, then open it with its kernel: the
 * file exists with `metadata["jupyter-gpu-sessions"]` before any kernel starts, so the
 * provisioner reads the choice at the first start.
 */
async function createNotebook(
  app: JupyterFrontEnd,
  spec: ILauncherSpec,
  choice: IChoice,
  cwd: string
): Promise<string> {
  const contents = app.serviceManager.contents;
  const model = await contents.newUntitled({ path: cwd, type: 'notebook' });
  const kernelspec =
    app.serviceManager.kernelspecs.specs?.kernelspecs[spec.name];
  await contents.save(model.path, {
    type: 'notebook',
    format: 'json',
    content: {
      cells: [
        {
          cell_type: 'code',
          execution_count: null,
          metadata: {},
          outputs: [],
          source: ''
        }
      ],
      metadata: {
        kernelspec: {
          name: spec.name,
          display_name: spec.display_name,
          language: kernelspec?.language ?? 'python'
        },
        [METADATA_KEY]: toMetadata(choice) as any
      },
      nbformat: 4,
      nbformat_minor: 5
    }
  });
  await app.commands.execute('docmanager:open', {
    path: model.path,
    factory: 'Notebook',
    kernel: { name: spec.name }
  });
  return model.path;
}

function currentKernelName(panel: NotebookPanel): string {
  return (
    panel.sessionContext.session?.kernel?.name ??
    (panel.model?.getMetadata('kernelspec') as any)?.name ??
    ''
  );
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-gpu-sessions:launcher',
  description:
    'A "GPU Sessions" launcher category and a resource dialog per kernelspec.',
  autoStart: true,
  requires: [ILauncher],
  optional: [
    IGPUSessionEvents,
    IStateDB,
    IMainMenu,
    ICommandPalette,
    INotebookTracker
  ],
  activate: (
    app: JupyterFrontEnd,
    launcher: ILauncher,
    events: IGPUSessionEvents | null,
    stateDB: IStateDB | null,
    mainMenu: IMainMenu | null,
    palette: ICommandPalette | null,
    notebooks: INotebookTracker | null
  ) => {
    const state = new LauncherState(app);
    let cards: { dispose(): void }[] = [];
    let shown = '';
    const paletteEntries = new Map<string, { dispose(): void }>();

    // The cards: one per kernelspec; re-added when the kernelspecs or the free count change
    // (the launcher re-renders a card's label when its items change).
    const updateCards = () => {
      const key = JSON.stringify([
        state.view.freeGPUs,
        state.view.specs.map(s => s.name)
      ]);
      app.commands.notifyCommandChanged(CommandIDs.newNotebook);
      if (key === shown) {
        return;
      }
      shown = key;
      cards.forEach(card => card.dispose());
      cards = state.view.specs.map((spec, rank) =>
        launcher.add({
          command: CommandIDs.newNotebook,
          args: { kernelName: spec.name },
          category: CATEGORY,
          rank
        })
      );
      // A palette entry per kernelspec too.
      for (const spec of state.view.specs) {
        if (palette && !paletteEntries.has(spec.name)) {
          paletteEntries.set(
            spec.name,
            palette.addItem({
              command: CommandIDs.newNotebook,
              category: CATEGORY,
              args: { kernelName: spec.name, isPalette: true }
            })
          );
        }
      }
    };
    let pending: Promise<void> | null = null;
    const refresh = () => {
      pending ??= state
        .refresh()
        .then(updateCards)
        .catch(error =>
          console.warn(
            'GPU Sessions: the launcher could not be refreshed',
            error
          )
        )
        .finally(() => {
          pending = null;
        });
      return pending;
    };
    // The dialog opens on the view the events keep fresh; an older one, or one that does
    // not know the kernelspec, is fetched first.
    const fresh = async (kernelName: string) => {
      if (Date.now() - state.fetchedAt > FRESH_MS || !state.spec(kernelName)) {
        await refresh();
      }
    };

    app.commands.addCommand(CommandIDs.newNotebook, {
      label: args => {
        const spec = state.spec(String(args.kernelName ?? ''));
        if (!spec) {
          return 'New Notebook with GPU Resources…';
        }
        return args.isPalette
          ? `New Notebook: ${spec.display_name}…`
          : cardLabel(spec.display_name, state.view.freeGPUs);
      },
      caption: args => {
        const spec = state.spec(String(args.kernelName ?? ''));
        return spec
          ? `A new notebook with ${spec.display_name}; choose its GPUs, CPUs, memory, image and vfolders`
          : 'A new notebook whose resources you choose';
      },
      icon: gpuIcon,
      execute: async args => {
        const name = String(args.kernelName ?? '');
        await fresh(name);
        const spec =
          state.spec(name) ?? (name ? undefined : state.view.specs[0]);
        if (!spec) {
          await showErrorMessage(
            'GPU Sessions',
            name
              ? `${name} is not a GPU session kernelspec on this server.`
              : 'This server has no GPU session kernelspec.'
          );
          return;
        }
        if (spec.error) {
          await showErrorMessage(
            'GPU Sessions',
            `${spec.display_name}: ${spec.error}`
          );
          return;
        }
        const last = fromMetadata((await lastChoices(stateDB))[spec.name]);
        const choice = await chooseResources(
          spec,
          prefill(spec, last),
          'Start'
        );
        if (!choice) {
          return;
        }
        await rememberChoice(stateDB, spec.name, choice);
        try {
          return await createNotebook(
            app,
            spec,
            choice,
            String(args.cwd ?? '')
          );
        } catch (error) {
          await showErrorMessage(
            'GPU Sessions: the notebook could not be created',
            error as Error
          );
        }
      }
    });

    app.commands.addCommand(CommandIDs.changeResources, {
      label: 'Change GPU Resources…',
      caption:
        "Choose this notebook's GPUs, CPUs, memory, image and vfolders (kept in the notebook)",
      isEnabled: () => {
        const panel = notebooks?.currentWidget;
        return !!panel && !!state.spec(currentKernelName(panel));
      },
      execute: async () => {
        const panel = notebooks?.currentWidget;
        if (!panel?.model) {
          return;
        }
        await fresh(currentKernelName(panel));
        const spec = state.spec(currentKernelName(panel));
        if (!spec) {
          await showErrorMessage(
            'GPU Sessions',
            "This notebook's kernel is not a GPU session kernelspec: choose one first (Kernel › Change Kernel…)."
          );
          return;
        }
        const existing = panel.model.getMetadata(METADATA_KEY);
        const last = fromMetadata((await lastChoices(stateDB))[spec.name]);
        const choice = await chooseResources(
          spec,
          prefill(spec, last, fromMetadata(existing)),
          'Save'
        );
        if (!choice) {
          return;
        }
        panel.model.setMetadata(METADATA_KEY, mergeMetadata(existing, choice));
        await panel.context.save();
        await rememberChoice(stateDB, spec.name, choice);
        if (!panel.sessionContext.session?.kernel) {
          return;
        }
        const restart = await showDialog({
          title: 'Restart the kernel?',
          body: `Saved: ${summary(choice) || 'the kernelspec’s defaults'}. The kernel gets them when it restarts; restart it now (its variables are lost)?`,
          buttons: [
            Dialog.cancelButton({ label: 'Later' }),
            Dialog.warnButton({ label: 'Restart' })
          ]
        });
        if (restart.button.accept) {
          await panel.sessionContext.restartKernel();
        }
      }
    });
    notebooks?.currentChanged.connect(() =>
      app.commands.notifyCommandChanged(CommandIDs.changeResources)
    );

    mainMenu?.kernelMenu.addGroup(
      [{ command: CommandIDs.changeResources }],
      30
    );
    if (palette) {
      palette.addItem({
        command: CommandIDs.changeResources,
        category: CATEGORY
      });
    }

    // My sessions' status changes, and GPU ticks (anyone's sessions taking or giving back
    // GPUs) that disagree with the count shown, refresh the cards.
    events?.received.connect((_, event) => {
      if (
        event.type === 'hello' ||
        event.type === 'status' ||
        (event.type === 'gpus' &&
          freeInTick(event.gpus) !== state.view.freeGPUs)
      ) {
        void refresh();
      }
    });
    void refresh();
    window.setInterval(() => {
      if (!document.hidden) {
        void refresh();
      }
    }, REFRESH_MS);
  }
};

export default plugin;
