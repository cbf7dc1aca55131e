"""What a client sends: its update, the defences on it, DP-SGD training, privacy accounting."""
