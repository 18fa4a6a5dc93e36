"""Code every package shares (the typed config loader)."""
