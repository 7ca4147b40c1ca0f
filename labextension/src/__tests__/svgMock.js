// An SVG file imported by JupyterLab's icons, for jest: an empty icon.
module.exports = '<svg xmlns="http://www.w3.org/2000/svg"></svg>';
