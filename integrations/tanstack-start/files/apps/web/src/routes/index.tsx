import { createFileRoute } from "@tanstack/react-router";
import { useState } from "react";
import { api } from "../lib/orpc";

export const Route = createFileRoute("/")({
  component: Home,
});

function Home() {
  const [name, setName] = useState("world");
  const [message, setMessage] = useState<string | null>(null);
  const [error, setError] = useState<string | null>(null);

  async function greet() {
    setError(null);
    try {
      const { message } = await api.hello({ name });
      setMessage(message);
    } catch (e) {
      setError(e instanceof Error ? e.message : String(e));
    }
  }

  return (
    <main style={{ fontFamily: "system-ui, sans-serif", padding: "2rem" }}>
      <h1>Welcome</h1>
      <input value={name} onChange={(e) => setName(e.target.value)} aria-label="Name" />
      <button type="button" onClick={greet}>
        Say hello
      </button>
      {message && <p>{message}</p>}
      {error && <p role="alert">{error}</p>}
    </main>
  );
}
