"""Text sources: the project's own synthetic children's stories (offline fallback and tests)."""
