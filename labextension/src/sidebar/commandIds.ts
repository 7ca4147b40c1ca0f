// The sidebar's command ids (category "GPU Sessions" in the command palette).

export const CommandIDs = {
  open: 'gpu-sessions:open-sidebar',
  refresh: 'gpu-sessions:refresh-sidebar',
  terminate: 'gpu-sessions:terminate-session',
  terminateWithDependents: 'gpu-sessions:terminate-session-with-dependents',
  showLogs: 'gpu-sessions:show-session-logs',
  toggleEnded: 'gpu-sessions:toggle-ended-sessions',
  toggleAllOwners: 'gpu-sessions:toggle-all-owners',
  createVFolder: 'gpu-sessions:create-vfolder',
  shareVFolder: 'gpu-sessions:share-vfolder',
  deleteVFolder: 'gpu-sessions:delete-vfolder',
  restoreVFolder: 'gpu-sessions:restore-vfolder'
} as const;

export const CATEGORY = 'GPU Sessions';
