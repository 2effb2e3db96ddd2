import "./env.js";
import { betterAuth } from "better-auth";
import { drizzleAdapter } from "better-auth/adapters/drizzle";
import { toNodeHandler } from "better-auth/node";
import * as authSchema from "./db/auth-schema.js";
import { db } from "./db/index.js";

export const auth = betterAuth({
  database: drizzleAdapter(db, { provider: "pg", schema: authSchema }),
  emailAndPassword: { enabled: true },
  secret: process.env.BETTER_AUTH_SECRET,
  baseURL: process.env.BETTER_AUTH_URL,
});

/** Better Auth's routes (`/api/auth/*`) for Node's http server. */
export const authHandler = toNodeHandler(auth);
