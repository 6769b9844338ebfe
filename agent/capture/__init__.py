"""Data capture for retraining: strategies choose frames, a durable spool keeps them, an uploader sends them to S3."""
