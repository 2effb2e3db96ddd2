import { os } from "@orpc/server";
import * as z from "zod";

/** The API's procedures, served at /rpc. Add yours here. */
export const router = {
  hello: os
    .input(z.object({ name: z.string().min(1).max(100) }))
    .handler(({ input }) => ({ message: `Hello, ${input.name}!` })),
};

export type Router = typeof router;
