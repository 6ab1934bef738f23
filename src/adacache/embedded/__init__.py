"""The embedded default model: a procedural video domain, its verifier, a small trained text-to-video DiT."""
