// The "GPU Sessions" sidebar: sessions, GPUs, vfolders and quota. Every button runs one of
// the sidebar's commands (the same ones the command palette lists), with the row's id.

import * as React from 'react';
import { ReactWidget, LabIcon, refreshIcon } from '@jupyterlab/ui-components';
import type { CommandRegistry } from '@lumino/commands';
import type { Message } from '@lumino/messaging';

import { CommandIDs } from './commandIds';
import {
  formatDuration,
  formatResources,
  gpuBars,
  heldGPUs,
  holderLabels,
  IUsageBar,
  owners,
  quotaLines,
  sessionAge,
  sortVFolders,
  vfolderUsage,
  formatBytes
} from './format';
import { canTerminate, hasLogs, SidebarModel } from './model';
import type { IGPU, ISession, IVFolder } from './types';

const GPU_SVG = `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" width="16">
<g class="jp-icon3" fill="#616161"><path d="M3 7h15a2 2 0 0 1 2 2v6a2 2 0 0 1-2 2H3V7zm2
2v6h13V9H5zm2 1h3v4H7v-4zm5 0h4v4h-4v-4zM21 10h2v4h-2zM5 17h2v2H5zm4 0h2v2H9zm4 0h2v2h-2z"/></g>
</svg>`;

export const gpuSessionsIcon = new LabIcon({
  name: 'jupyter-gpu-sessions:sidebar',
  svgstr: GPU_SVG
});

// How often the ages shown are brought up to date while the panel is visible.
const AGE_TICK_MS = 5000;

export class GPUSessionsPanel extends ReactWidget {
  constructor(model: SidebarModel, commands: CommandRegistry) {
    super();
    this.model = model;
    this.commands = commands;
    this.id = 'jp-gpu-sessions-sidebar';
    this.addClass('jp-gpu-sessions-sidebar');
    this.title.icon = gpuSessionsIcon;
    this.title.caption = 'GPU Sessions';
    // Hidden, it is brought up to date when shown again.
    model.changed.connect(() => {
      if (this.isVisible) {
        this.update();
      }
    }, this);
  }

  readonly model: SidebarModel;
  readonly commands: CommandRegistry;

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this.update();
    void this.model.refresh();
    this._ticker = setInterval(() => this.update(), AGE_TICK_MS);
  }

  protected onAfterHide(msg: Message): void {
    super.onAfterHide(msg);
    this._stopTicker();
  }

  dispose(): void {
    this._stopTicker();
    super.dispose();
  }

  render(): JSX.Element {
    return <SidebarView model={this.model} commands={this.commands} />;
  }

  private _stopTicker(): void {
    if (this._ticker !== null) {
      clearInterval(this._ticker);
      this._ticker = null;
    }
  }

  private _ticker: ReturnType<typeof setInterval> | null = null;
}

interface IViewProps {
  model: SidebarModel;
  commands: CommandRegistry;
}

function SidebarView({ model, commands }: IViewProps): JSX.Element {
  const run = (id: string, args: Record<string, any> = {}) => {
    void commands.execute(id, args);
  };
  return (
    <div className="jp-gpu-sessions-sidebar-body">
      <header className="jp-gpu-sessions-sidebar-header">
        <h2>GPU Sessions</h2>
        <button
          className="jp-gpu-sessions-icon-button"
          aria-label="Refresh GPU Sessions"
          title="Refresh"
          onClick={() => run(CommandIDs.refresh)}
        >
          <refreshIcon.react tag="span" />
        </button>
      </header>
      {model.error && (
        <div className="jp-gpu-sessions-error" role="alert">
          {model.error}
        </div>
      )}
      <SessionsSection model={model} run={run} />
      <GPUsSection model={model} />
      <VFoldersSection model={model} run={run} />
      <QuotaSection model={model} />
    </div>
  );
}

type Run = (id: string, args?: Record<string, any>) => void;

function Bar({
  bar,
  label
}: {
  bar: IUsageBar;
  label: string;
}): JSX.Element | null {
  if (bar.fraction === null) {
    return null;
  }
  const percent = Math.round(bar.fraction * 100);
  return (
    <div
      className="jp-gpu-sessions-bar"
      role="progressbar"
      aria-label={label}
      aria-valuemin={0}
      aria-valuemax={100}
      aria-valuenow={percent}
      title={`${label}: ${bar.percent}`}
    >
      <div
        className={`jp-gpu-sessions-bar-fill jp-mod-${bar.level}`}
        style={{ width: `${percent}%` }}
      />
    </div>
  );
}

/** Arrow keys move between the rows of a list; the row's own keys act on it. */
function moveFocus(event: React.KeyboardEvent<HTMLElement>): boolean {
  if (event.key !== 'ArrowDown' && event.key !== 'ArrowUp') {
    return false;
  }
  const row = event.currentTarget;
  const next =
    event.key === 'ArrowDown'
      ? row.nextElementSibling
      : row.previousElementSibling;
  if (next instanceof HTMLElement) {
    next.focus();
  }
  event.preventDefault();
  return true;
}

function SessionsSection({
  model,
  run
}: {
  model: SidebarModel;
  run: Run;
}): JSX.Element {
  const now = Date.now() / 1000;
  const sessions = model.shownSessions;
  const filterValue =
    model.filter.kind === 'owner'
      ? `owner:${model.filter.owner}`
      : model.filter.kind;
  return (
    <section
      className="jp-gpu-sessions-section"
      aria-labelledby="jp-gpu-sessions-sessions"
    >
      <div className="jp-gpu-sessions-section-header">
        <h3 id="jp-gpu-sessions-sessions">
          {model.admin ? 'Sessions' : 'My sessions'}
        </h3>
        {model.admin && (
          <select
            className="jp-gpu-sessions-owner"
            aria-label="Whose sessions"
            value={filterValue}
            onChange={event => {
              const value = event.currentTarget.value;
              model.setFilter(
                value.startsWith('owner:')
                  ? { kind: 'owner', owner: value.slice(6) }
                  : { kind: value as 'all' | 'mine' }
              );
            }}
          >
            <option value="all">All owners</option>
            <option value="mine">Mine</option>
            {owners(model.sessions, model.me)
              .filter(name => name !== model.me)
              .map(name => (
                <option key={name} value={`owner:${name}`}>
                  {name}
                </option>
              ))}
          </select>
        )}
        <label className="jp-gpu-sessions-ended">
          <input
            type="checkbox"
            checked={model.showEnded}
            onChange={() => run(CommandIDs.toggleEnded)}
          />
          ended
        </label>
      </div>
      {sessions.length === 0 ? (
        <p className="jp-gpu-sessions-empty">
          {model.loaded ? 'No sessions.' : 'Loading…'}
        </p>
      ) : (
        <ul className="jp-gpu-sessions-list" aria-label="Sessions">
          {sessions.map(session => (
            <SessionRow
              key={session.id}
              session={session}
              model={model}
              run={run}
              now={now}
            />
          ))}
        </ul>
      )}
    </section>
  );
}

function SessionRow({
  session,
  model,
  run,
  now
}: {
  session: ISession;
  model: SidebarModel;
  run: Run;
  now: number;
}): JSX.Element {
  const label = session.name || session.id.slice(0, 12);
  const selected = model.selectedSession === session.id;
  const gpus = heldGPUs(session.allocations, model.gpus);
  const details = [
    formatResources(session.request),
    gpus,
    formatDuration(sessionAge(session, now))
  ];
  if (model.admin && session.owner !== model.me) {
    details.unshift(session.owner);
  }
  const note =
    session.status === 'PENDING'
      ? session.queue_message
      : !canTerminate(session)
        ? session.reason
        : '';
  return (
    <li
      className={`jp-gpu-sessions-row${selected ? ' jp-mod-selected' : ''}`}
      tabIndex={0}
      aria-selected={selected}
      aria-label={`Session ${label}, ${session.status.toLowerCase()}`}
      data-session-id={session.id}
      data-kernel-id={session.kernel_id ?? ''}
      data-status={session.status}
      onFocus={() =>
        model.selectedSession !== session.id &&
        model.select('session', session.id)
      }
      onClick={() => model.select('session', session.id)}
      onKeyDown={event => {
        if (event.target !== event.currentTarget || moveFocus(event)) {
          return;
        }
        if (event.key === 'Delete' && canTerminate(session)) {
          run(CommandIDs.terminate, { id: session.id });
        } else if (event.key === 'Enter' && hasLogs(session)) {
          run(CommandIDs.showLogs, { id: session.id });
        }
      }}
    >
      <div className="jp-gpu-sessions-row-title">
        <span className="jp-gpu-sessions-name" title={session.id}>
          {label}
        </span>
        <span
          className={`jp-gpu-sessions-status jp-mod-${session.status.toLowerCase()}`}
        >
          {session.status.toLowerCase()}
        </span>
      </div>
      <div className="jp-gpu-sessions-row-details">
        {details.filter(Boolean).join(' · ')}
      </div>
      {note && <div className="jp-gpu-sessions-row-note">{note}</div>}
      <div className="jp-gpu-sessions-row-actions">
        <button
          className="jp-gpu-sessions-button"
          aria-label={`Show logs of ${label}`}
          disabled={!hasLogs(session)}
          onClick={event => {
            event.stopPropagation();
            run(CommandIDs.showLogs, { id: session.id });
          }}
        >
          Logs
        </button>
        <button
          className="jp-gpu-sessions-button jp-mod-warn"
          aria-label={`Terminate ${label}`}
          disabled={!canTerminate(session)}
          onClick={event => {
            event.stopPropagation();
            run(CommandIDs.terminate, { id: session.id });
          }}
        >
          Terminate
        </button>
      </div>
    </li>
  );
}

function GPUsSection({ model }: { model: SidebarModel }): JSX.Element {
  return (
    <section
      className="jp-gpu-sessions-section"
      aria-labelledby="jp-gpu-sessions-gpus"
    >
      <div className="jp-gpu-sessions-section-header">
        <h3 id="jp-gpu-sessions-gpus">GPUs</h3>
      </div>
      {model.gpus.length === 0 ? (
        <p className="jp-gpu-sessions-empty">
          {model.loaded ? 'No GPUs on this host.' : 'Loading…'}
        </p>
      ) : (
        <ul className="jp-gpu-sessions-list" aria-label="GPUs">
          {model.gpus.map(gpu => (
            <GPURow key={gpu.uuid} gpu={gpu} me={model.me} />
          ))}
        </ul>
      )}
    </section>
  );
}

function GPURow({ gpu, me }: { gpu: IGPU; me: string }): JSX.Element {
  const bars = gpuBars(gpu);
  const holders = holderLabels(gpu, me);
  const simulated =
    gpu.simulated && !/simulated/i.test(gpu.name) ? ' (simulated)' : '';
  const title = `GPU ${gpu.index} · ${gpu.name}${simulated}`;
  return (
    <li
      className="jp-gpu-sessions-row"
      tabIndex={0}
      aria-label={`${title}, ${holders.length ? `held by ${holders.join('; ')}` : 'free'}`}
      data-gpu-index={gpu.index}
      data-held={holders.length ? 'true' : 'false'}
      onKeyDown={moveFocus}
    >
      <div className="jp-gpu-sessions-row-title">
        <span className="jp-gpu-sessions-name">{title}</span>
        <span className="jp-gpu-sessions-percent">{bars.compute.percent}</span>
      </div>
      <Bar bar={bars.compute} label={`GPU ${gpu.index} utilization`} />
      <div className="jp-gpu-sessions-row-details">
        memory {bars.memoryText}
      </div>
      <Bar bar={bars.memory} label={`GPU ${gpu.index} memory`} />
      <ul className="jp-gpu-sessions-holders">
        {holders.length === 0 ? (
          <li className="jp-gpu-sessions-free">free</li>
        ) : (
          holders.map((holder, i) => (
            <li
              key={i}
              className="jp-gpu-sessions-holder"
              data-session-id={gpu.holders[i].session_id ?? ''}
            >
              {holder}
            </li>
          ))
        )}
        {gpu.usage
          .filter(u => u.memory_used)
          .map((u, i) => (
            <li key={`usage-${i}`} className="jp-gpu-sessions-usage">
              {u.session_id === null
                ? 'other processes'
                : u.name || u.session_id.slice(0, 12)}
              : {formatBytes(u.memory_used)}
              {u.utilization !== null ? ` · ${u.utilization}%` : ''}
            </li>
          ))}
      </ul>
    </li>
  );
}

function VFoldersSection({
  model,
  run
}: {
  model: SidebarModel;
  run: Run;
}): JSX.Element {
  const folders = sortVFolders(model.vfolders);
  return (
    <section
      className="jp-gpu-sessions-section"
      aria-labelledby="jp-gpu-sessions-vfolders"
    >
      <div className="jp-gpu-sessions-section-header">
        <h3 id="jp-gpu-sessions-vfolders">vfolders</h3>
        <button
          className="jp-gpu-sessions-button"
          aria-label="Create vfolder"
          onClick={() => run(CommandIDs.createVFolder)}
        >
          New…
        </button>
      </div>
      {folders.length === 0 ? (
        <p className="jp-gpu-sessions-empty">
          {model.loaded ? 'No vfolders.' : 'Loading…'}
        </p>
      ) : (
        <ul className="jp-gpu-sessions-list" aria-label="vfolders">
          {folders.map(folder => (
            <VFolderRow
              key={folder.id}
              folder={folder}
              model={model}
              run={run}
            />
          ))}
        </ul>
      )}
      {model.trash.length > 0 && (
        <>
          <h4 className="jp-gpu-sessions-subheading">Trash</h4>
          <ul className="jp-gpu-sessions-list" aria-label="Trashed vfolders">
            {model.trash.map(folder => (
              <li
                key={folder.id}
                className="jp-gpu-sessions-row"
                tabIndex={0}
                data-vfolder={folder.name}
                data-trashed="true"
                aria-label={`Trashed vfolder ${folder.name}`}
                onFocus={() => model.select('vfolder', folder.name)}
                onKeyDown={moveFocus}
              >
                <div className="jp-gpu-sessions-row-title">
                  <span className="jp-gpu-sessions-name">{folder.name}</span>
                  <button
                    className="jp-gpu-sessions-button"
                    aria-label={`Restore vfolder ${folder.name}`}
                    onClick={() =>
                      run(CommandIDs.restoreVFolder, { name: folder.name })
                    }
                  >
                    Restore
                  </button>
                </div>
              </li>
            ))}
          </ul>
        </>
      )}
    </section>
  );
}

function VFolderRow({
  folder,
  model,
  run
}: {
  folder: IVFolder;
  model: SidebarModel;
  run: Run;
}): JSX.Element {
  const usage = vfolderUsage(folder);
  const own = folder.relation === 'own';
  const selected = model.selectedVFolder === folder.name;
  const relation =
    folder.relation === 'own'
      ? folder.type === 'project'
        ? `project · ${folder.group}`
        : 'mine'
      : folder.relation === 'group'
        ? `group ${folder.group} · ${folder.permission}`
        : `shared by ${folder.owner} · ${folder.permission}`;
  return (
    <li
      className={`jp-gpu-sessions-row${selected ? ' jp-mod-selected' : ''}`}
      tabIndex={0}
      aria-selected={selected}
      aria-label={`vfolder ${folder.name}, ${usage.text}`}
      data-vfolder={folder.name}
      onFocus={() => !selected && model.select('vfolder', folder.name)}
      onClick={() => model.select('vfolder', folder.name)}
      onKeyDown={event => {
        if (event.target !== event.currentTarget || moveFocus(event)) {
          return;
        }
        if (event.key === 'Delete' && own) {
          run(CommandIDs.deleteVFolder, { name: folder.name });
        }
      }}
    >
      <div className="jp-gpu-sessions-row-title">
        <span className="jp-gpu-sessions-name">{folder.name}</span>
        <span className="jp-gpu-sessions-tag">{relation}</span>
      </div>
      <div className="jp-gpu-sessions-row-details">{usage.text}</div>
      <Bar bar={usage.bar} label={`${folder.name} storage`} />
      {own && (
        <div className="jp-gpu-sessions-row-actions">
          <button
            className="jp-gpu-sessions-button"
            aria-label={`Share vfolder ${folder.name}`}
            onClick={event => {
              event.stopPropagation();
              run(CommandIDs.shareVFolder, { name: folder.name });
            }}
          >
            Share…
          </button>
          <button
            className="jp-gpu-sessions-button jp-mod-warn"
            aria-label={`Delete vfolder ${folder.name}`}
            onClick={event => {
              event.stopPropagation();
              run(CommandIDs.deleteVFolder, { name: folder.name });
            }}
          >
            Delete
          </button>
        </div>
      )}
    </li>
  );
}

function QuotaSection({ model }: { model: SidebarModel }): JSX.Element | null {
  const quota = model.quota;
  if (!quota) {
    return null;
  }
  return (
    <section
      className="jp-gpu-sessions-section"
      aria-labelledby="jp-gpu-sessions-quota"
    >
      <div className="jp-gpu-sessions-section-header">
        <h3 id="jp-gpu-sessions-quota">My quota</h3>
        <span className="jp-gpu-sessions-tag">
          {quota.user}
          {quota.admin ? ' · admin' : ''}
        </span>
      </div>
      <table className="jp-gpu-sessions-quota">
        <tbody>
          {quotaLines(quota).map(line => (
            <tr key={line.label}>
              <th scope="row">{line.label}</th>
              <td>
                {line.text}
                <Bar bar={line.bar} label={`${line.label} used`} />
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}
