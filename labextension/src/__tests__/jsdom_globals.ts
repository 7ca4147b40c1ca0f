// What jsdom lacks and Lumino needs at load: its drag and drop (under every Widget)
// subclasses DragEvent. Imported before any Lumino module by the specs that build widgets.

(globalThis as any).DragEvent ??= class DragEvent extends MouseEvent {};
