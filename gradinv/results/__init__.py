"""The results store that sweep writes and analysis reads: schema, journal, Parquet directory."""
