"""What a results folder says: tables and plots (`report`) and the flip-aware CI gate (`regression`)."""
