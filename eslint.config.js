// @ts-check
import js from "@eslint/js";
import tseslint from "typescript-eslint";

const nodeModules = [
  "fs",
  "path",
  "os",
  "net",
  "child_process",
  "worker_threads",
  "crypto",
  "util",
  "events",
  "stream",
  "url",
  "module",
  "process",
  "buffer",
  "timers",
];

export default tseslint.config(
  { ignores: ["dist/", "build/", "node_modules/", "fuzz/corpus/", "tmp/", ".cache/", "**/*.js"] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      "@typescript-eslint/no-unused-vars": ["error", { argsIgnorePattern: "^_", varsIgnorePattern: "^_" }],
      "@typescript-eslint/no-non-null-assertion": "off",
      "no-constant-condition": ["error", { checkLoops: false }],
      "no-empty": ["error", { allowEmptyCatch: false }],
    },
  },
  {
    // DESIGN.md: src/core runs in a browser too, so it may not import Node modules.
    files: ["src/core/**/*.ts"],
    rules: {
      "no-restricted-imports": [
        "error",
        {
          patterns: [{ group: ["node:*"], message: "src/core is portable: no node:* imports" }],
          paths: nodeModules.map((name) => ({ name, message: "src/core is portable: no Node modules" })),
        },
      ],
      "no-restricted-globals": [
        "error",
        { name: "Buffer", message: "src/core is portable: use Uint8Array" },
        { name: "process", message: "src/core is portable" },
        { name: "require", message: "src/core is ESM and portable" },
      ],
    },
  },
);
