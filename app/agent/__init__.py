"""The agent runtime (consumer groups over the work shards) and the built-in agents."""
