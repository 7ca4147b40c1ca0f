// The resource dialog: the form in a JupyterLab dialog, shown again with its problems
// until the choice is one the server may start.

import { Dialog } from '@jupyterlab/apputils';

import { IChoice, ILauncherSpec, problems } from './choice';
import { ResourceForm } from './form';

/**
 * Ask for a kernelspec's resources, starting from `initial`. The choice, or null when
 * cancelled; a choice with problems (a value not offered or forbidden) is shown again
 * with them until it has none or the person cancels.
 */
export async function chooseResources(
  spec: ILauncherSpec,
  initial: IChoice,
  okLabel: string
): Promise<IChoice | null> {
  let current = initial;
  let shown: string[] = [];
  for (;;) {
    const body = new ResourceForm(spec, current, shown);
    const result = await new Dialog<IChoice>({
      title: `Resources · ${spec.display_name}`,
      body,
      buttons: [Dialog.cancelButton(), Dialog.okButton({ label: okLabel })],
      focusNodeSelector: 'select, input'
    }).launch();
    if (!result.button.accept || !result.value) {
      return null;
    }
    shown = problems(spec, result.value);
    if (!shown.length) {
      return result.value;
    }
    current = result.value;
  }
}
