"""text_encoders plugin module (filled in by its issue)."""
