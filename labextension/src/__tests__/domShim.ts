// What jsdom lacks and JupyterLab's widgets need at import (JupyterLab's own test shim
// provides the same): imported first by the specs that attach widgets.

const global = globalThis as any;

if (typeof global.DragEvent === 'undefined') {
  global.DragEvent = class DragEvent extends MouseEvent {};
}

if (typeof window.matchMedia !== 'function') {
  window.matchMedia = (query: string) =>
    ({
      matches: false,
      media: query,
      onchange: null,
      addListener: () => undefined,
      removeListener: () => undefined,
      addEventListener: () => undefined,
      removeEventListener: () => undefined,
      dispatchEvent: () => false
    }) as MediaQueryList;
}

if (typeof global.requestIdleCallback !== 'function') {
  global.requestIdleCallback = (callback: () => void) =>
    setTimeout(callback, 0);
  global.cancelIdleCallback = (handle: ReturnType<typeof setTimeout>) =>
    clearTimeout(handle);
}

export {};
