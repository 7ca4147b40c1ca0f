// Unit tests of the extension's TypeScript logic: ts-jest in a jsdom environment.
// JupyterLab and Lumino ship ES modules, so they are transformed too.
const esModules = [
  '@jupyterlab/',
  '@lumino/',
  '@jupyter/',
  '@codemirror/',
  '@microsoft/',
  'exenv-es6',
  'lib0',
  'nanoid',
  'vscode-ws-jsonrpc',
  'y-protocols',
  'y-websocket',
  'yjs'
].join('|');

module.exports = {
  testEnvironment: 'jsdom',
  testRegex: 'src/.*/.*\\.spec\\.tsx?$',
  transform: {
    '^.+\\.[tj]sx?$': ['ts-jest', { tsconfig: 'tsconfig.test.json' }]
  },
  moduleNameMapper: {
    '\\.(css|less|sass|scss)$': '<rootDir>/src/__tests__/styleMock.js',
    '\\.svg$': '<rootDir>/src/__tests__/svgMock.js'
  },
  transformIgnorePatterns: [`/node_modules/(?!${esModules}).+`]
};
