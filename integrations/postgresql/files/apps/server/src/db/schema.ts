import { pgTable, serial, text, timestamp } from "drizzle-orm/pg-core";

/** The app's tables. Change them, then `pnpm --filter server db:push` (or db:generate). */
export const notes = pgTable("notes", {
  id: serial("id").primaryKey(),
  text: text("text").notNull(),
  createdAt: timestamp("created_at", { withTimezone: true }).notNull().defaultNow(),
});
