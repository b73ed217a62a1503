"""metrics plugin module (filled in by its issue)."""
