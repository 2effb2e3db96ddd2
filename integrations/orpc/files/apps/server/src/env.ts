// Loads apps/server/.env (written in local mode) before anything reads the environment;
// variables already set in the environment win. Node 20.12+ has process.loadEnvFile.
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";

const file = fileURLToPath(new URL("../.env", import.meta.url));
if (existsSync(file)) {
  process.loadEnvFile(file);
}
